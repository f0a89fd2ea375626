"""The victim zoo: small models trained locally on first use and cached as TorchScript.

Cache directory: the ``cache_dir`` argument, else ``$MOAT_CACHE_DIR``, else ``~/.cache/moat``. Each model
is stored as ``<name>-<version>.pt`` (TorchScript) with a JSON sidecar ``<name>-<version>.json`` holding its
metadata (arch, seed, accuracy, embedding dim, training seconds, sha256 of the ``.pt``). Files are written
atomically; a cache entry that fails its checksum or does not load is rebuilt with a warning.

Command line: ``python -m evaluation.zoo build NAME...`` (``list`` shows the registry).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "BUILD_COUNTS",
    "ZOO",
    "BuildResult",
    "ZooSpec",
    "available",
    "cache_root",
    "dependency",
    "load_victim",
    "main",
    "metadata",
    "quiet_jit",
    "register",
    "zoo_path",
]

BuildResult = tuple[torch.jit.ScriptModule, dict[str, Any]]


@dataclass(frozen=True)
class ZooSpec:
    """A zoo entry. ``builder(seed, progress)`` trains the model and returns (TorchScript module, metadata).

    ``input_shape`` is one example's ``(C, H, W)`` (float32 in [0, 1]); ``output_dim`` is the width of
    ``forward``'s float32 output: class probabilities for ``kind="classifier"``, a representation for
    ``kind="encoder"``.
    """

    name: str
    version: int
    kind: Literal["classifier", "encoder"]
    input_shape: tuple[int, int, int]
    output_dim: int
    builder: Callable[[int, bool], BuildResult]
    seed: int = 0
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        return f"{self.name}-{self.version}"


ZOO: dict[str, ZooSpec] = {}
#: How many times each name was (re)built in this process; lets tests see that the cache was used.
BUILD_COUNTS: Counter[str] = Counter()
_LOCK = threading.RLock()  # re-entrant: a builder may build the entry it depends on
_BUILDING = threading.local()  # stack of cache roots of the builds in progress on this thread


def register(spec: ZooSpec) -> ZooSpec:
    """Add ``spec`` to :data:`ZOO`; a name that is already registered raises ValueError."""
    if spec.name in ZOO:
        raise ValueError(f"zoo model {spec.name!r} is already registered")
    if spec.kind not in ("classifier", "encoder"):
        raise ValueError(f"kind must be 'classifier' or 'encoder', got {spec.kind!r}")
    ZOO[spec.name] = spec
    return spec


def available() -> list[str]:
    """Registered model names, sorted."""
    return sorted(ZOO)


def _spec(name: str) -> ZooSpec:
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {available()}") from None


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``cache_dir``, else ``$MOAT_CACHE_DIR``, else ``~/.cache/moat``."""
    root = cache_dir if cache_dir is not None else os.environ.get("MOAT_CACHE_DIR") or "~/.cache/moat"
    return Path(root).expanduser()


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    """Silence torch's FutureWarning that TorchScript is deprecated (recent torch releases); the zoo format is TorchScript."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialize builds of one entry across threads and processes (flock where available)."""
    with _LOCK, open(path, "a+b") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cache_problem(spec: ZooSpec, pt: Path, meta: Path) -> str | None:
    """Why the cached entry is unusable, or None when it is valid (or simply absent: returns 'missing')."""
    if not pt.exists():
        return "missing"
    try:
        info = json.loads(meta.read_text())
        if info.get("sha256") != _sha256(pt) or info.get("version") != spec.version:
            return "checksum or version mismatch"
        with quiet_jit():
            torch.jit.load(str(pt), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure means rebuild
        return f"{type(exc).__name__}: {exc}"
    return None


def zoo_path(name: str, cache_dir: str | os.PathLike[str] | None = None, rebuild: bool = False,
             progress: bool = True) -> Path:
    """Path of ``name``'s TorchScript file, training and caching it first if needed (or if ``rebuild``)."""
    spec = _spec(name)
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    pt, meta = root / f"{spec.stem}.pt", root / f"{spec.stem}.json"
    with _file_lock(root / f".{spec.stem}.lock"):
        problem = "rebuild requested" if rebuild else _cache_problem(spec, pt, meta)
        if problem is None:
            return pt
        if problem not in ("missing", "rebuild requested"):
            warnings.warn(f"zoo cache entry {pt} is unusable ({problem}); rebuilding", RuntimeWarning, stacklevel=2)
        threads = torch.get_num_threads()
        torch.set_num_threads(min(threads, 2) if threads > 0 else 2)
        t0 = time.perf_counter()
        _BUILDING.roots = [*getattr(_BUILDING, "roots", []), root]
        try:
            with quiet_jit():
                module, info = spec.builder(spec.seed, progress)
        finally:
            _BUILDING.roots.pop()
            torch.set_num_threads(threads)
        BUILD_COUNTS[name] += 1
        with quiet_jit():
            _atomic_write(pt, lambda tmp: torch.jit.save(module, tmp))
        info = {"name": spec.name, "version": spec.version, "kind": spec.kind, "seed": spec.seed,
                "input_shape": list(spec.input_shape), "output_dim": spec.output_dim,
                "build_seconds": round(time.perf_counter() - t0, 2), "torch": torch.__version__,
                **info, "sha256": _sha256(pt)}
        _atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n"))
        return pt


def metadata(name: str, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The JSON sidecar of ``name`` (builds the model first if needed)."""
    pt = zoo_path(name, cache_dir)
    return dict(json.loads(pt.with_suffix(".json").read_text()))


def load_victim(name: str, cache_dir: str | os.PathLike[str] | None = None,
                device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load ``name`` (building it if needed) as a TorchScript module in eval mode on ``device``.

    Input: float32 ``[B, *spec.input_shape]`` in [0, 1]; output float32 ``[B, spec.output_dim]``.
    """
    path = zoo_path(name, cache_dir)
    with quiet_jit():
        module = torch.jit.load(str(path), map_location=device)
    return module.eval()


def model_source(spec: object, field: str) -> torch.jit.ScriptModule:
    """The ``zoo: NAME`` model source of the gateway's embedded backend (declared as an entry point
    in ``moat.model_sources``, so the gateway serves zoo victims without importing this package)."""
    if not isinstance(spec, str):
        raise ValueError(f"must be a zoo model name ({', '.join(available())}), got {spec!r}")
    return load_victim(spec)


def dependency(name: str) -> torch.jit.ScriptModule:
    """Inside a builder: load zoo entry ``name`` from the cache root of the build in progress (building it first)."""
    roots = getattr(_BUILDING, "roots", None)
    return load_victim(name, roots[-1] if roots else None)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m evaluation.zoo {build NAME... | list}``."""
    parser = argparse.ArgumentParser(prog="python -m evaluation.zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="default: $MOAT_CACHE_DIR or ~/.cache/moat")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (train) and cache models")
    b.add_argument("names", nargs="*", help=f"default: all ({', '.join(available())})")
    b.add_argument("--rebuild", action="store_true", help="retrain even if cached")
    sub.add_parser("list", help="list registered models")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for n in available():
            print(f"{n}\t{ZOO[n].kind}\t{ZOO[n].description}")
        return 0
    names = args.names or available()
    bad = [n for n in names if n not in ZOO]
    if bad:
        parser.error(f"unknown zoo model(s) {bad}; valid names: {available()}")
    for n in names:
        path = zoo_path(n, args.cache_dir, rebuild=args.rebuild)
        info = json.loads(path.with_suffix(".json").read_text())
        keys = ("test_accuracy", "linear_probe_accuracy", "train_seconds")
        print(f"{n}: {path} " + " ".join(f"{k}={info[k]}" for k in keys if k in info))
    return 0


# The built-in victims register themselves; imported last, as they use what is defined above.
from evaluation import zoo_victims  # noqa: E402,F401

if __name__ == "__main__":
    # Run as a script this file is `__main__`, a second copy of the module: the victims registered
    # into `evaluation.zoo`, whose main is the one to run.
    from evaluation.zoo import main as zoo_main

    raise SystemExit(zoo_main())
