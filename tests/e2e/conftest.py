"""Black-box fixtures: `moat serve` as a subprocess, driven by the stock tritonclient.

This process must never import moat's `protos.inference_pb2` (it would clash with
tritonclient's own `inference` protos in protobuf's global descriptor pool).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as triton
import yaml

from tests.servers.procs import REPO, Proc, start_gateway

DEMO_CONFIG = REPO / "deploy" / "configs" / "demo.yaml"
ALICE = {"authorization": "Bearer demo-alice-key"}
BOB = {"x-api-key": "demo-bob-key"}


def client(proc: Proc) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{proc.info['grpc']}")


def write_config(path: Path, base: Path = DEMO_CONFIG, **server: object) -> Path:
    """A copy of ``base`` with ``server`` overrides; the keys file path is made absolute."""
    data = yaml.safe_load(base.read_text())
    data["auth"]["keys_file"] = str((base.parent / data["auth"]["keys_file"]).resolve())
    data["server"].update(server)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """The demo gateway (embedded zoo models; the first start trains and caches them)."""
    proc = start_gateway(DEMO_CONFIG, tmp_path_factory.mktemp("demo"), timeout=900)
    yield proc
    proc.stop()


def infer_input(name: str, array, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor
