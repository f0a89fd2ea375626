"""Regenerate the Python modules from the .proto sources (``make protos``).

Run from the repository root. The generated files are committed and never edited by hand;
``tests/unit/test_protos_fresh.py`` regenerates them into a temporary directory and fails
when the committed copies differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("inference.proto", "admin.proto")


def generate(out_root: Path) -> None:
    """Write ``protos/<name>_pb2.py``, ``_pb2.pyi`` and ``_pb2_grpc.py`` under ``out_root``."""
    repo_root = PROTO_DIR.parent
    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    for name in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{repo_root}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(Path("protos") / name),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on protos/{name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_DIR.parent, help="output root")
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
