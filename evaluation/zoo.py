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

import numpy as np
import torch

from evaluation.data import load_digits_dataset, load_fashion_mnist
from evaluation.zoo_models import (
    EncoderClassifier,
    FashionEncoder,
    embed,
    fit_logits,
    linear_probe_accuracy,
    train_classifier,
    train_simclr,
)

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
    "public_pretraining_images",
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


# ----------------------------------------------------------------------------- builders
def _test_accuracy(module: torch.jit.ScriptModule) -> float:
    test = load_fashion_mnist("test")
    probs = embed(module, test.images)
    return float((probs.argmax(1) == test.labels).mean())


def build_fashion_classifier(seed: int, progress: bool) -> BuildResult:
    """Supervised 3-block CNN on the Fashion-MNIST train split (60000 images).

    TorchScript ``forward``: float32 ``[B,1,28,28]`` in [0,1] -> softmax probabilities float32 ``[B,10]``;
    ``features``: -> penultimate activations float32 ``[B,128]``. Reaches ~90.6% test accuracy in ~40 s.
    """
    train = load_fashion_mnist("train")
    t0 = time.perf_counter()
    model = train_classifier(train.images, train.labels, epochs=3, seed=seed, progress=progress)
    seconds = time.perf_counter() - t0
    scripted = torch.jit.script(model)
    return scripted, {"arch": "FashionCNN(conv16-32-64, fc128, softmax)", "train_seconds": round(seconds, 2),
                      "test_accuracy": round(_test_accuracy(scripted), 4), "embedding_dim": model.head.in_features,
                      "classes": list(train.classes)}


def build_fashion_encoder(seed: int, progress: bool) -> BuildResult:
    """SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations")
    encoder trained on the Fashion-MNIST train images without labels.

    TorchScript ``forward``: float32 ``[B,1,28,28]`` in [0,1] -> representation float32 ``[B,128]`` (before
    the projection head, not L2-normalized). The sidecar records a linear-probe accuracy: logistic
    regression on frozen representations of 10000 train / 10000 test images (~85%; note that a randomly
    initialised encoder of the same shape already probes at ~83% on Fashion-MNIST, so the probe is a weak
    signal: what SimCLR adds most is invariance to the augmentations).
    """
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    t0 = time.perf_counter()
    model, loss = train_simclr(train.images, steps=500, batch=256, temperature=0.5, seed=seed, progress=progress)
    seconds = time.perf_counter() - t0
    scripted = torch.jit.script(model)
    idx = np.random.default_rng(seed).permutation(len(train))[:10000]
    probe = linear_probe_accuracy(embed(scripted, train.images[idx]), train.labels[idx],
                                  embed(scripted, test.images), test.labels, seed=seed)
    return scripted, {"arch": "FashionEncoder(conv16-32-64, fc128+BN; projector 128-128-64)",
                      "method": "SimCLR NT-Xent, temperature 0.5, batch 256, 500 steps",
                      "train_seconds": round(seconds, 2), "final_loss": round(loss, 4), "embedding_dim": 128,
                      "normalized": False, "linear_probe_accuracy": round(probe, 4),
                      "linear_probe": "sklearn LogisticRegression, 10000 train / 10000 test"}


register(ZooSpec("fashion-classifier", 1, "classifier", (1, 28, 28), 10, build_fashion_classifier,
                 description="small CNN, Fashion-MNIST, softmax output, features() -> [B,256]"))
register(ZooSpec("fashion-encoder", 1, "encoder", (1, 28, 28), 128, build_fashion_encoder,
                 description="SimCLR CNN encoder, Fashion-MNIST (no labels), 128-d representation"))


def dependency(name: str) -> torch.jit.ScriptModule:
    """Inside a builder: load zoo entry ``name`` from the cache root of the build in progress (building it first)."""
    roots = getattr(_BUILDING, "roots", None)
    return load_victim(name, roots[-1] if roots else None)


def _photo_crops(n: int, seed: int) -> np.ndarray:
    """``n`` random square crops (10-100% of the short side) of scikit-image's bundled photos, grayscale,
    resized to 28x28 with torch's antialiased bilinear resize (the same recipe as
    :func:`evaluation.data.natural_image_crops`, ~40x faster). float32 ``[n, 1, 28, 28]`` in [0, 1]."""
    from evaluation.data import _natural_photos

    lum = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
    photos = [torch.from_numpy(np.ascontiguousarray(p @ lum)) for p in _natural_photos()]
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 1, 28, 28)
    for i in range(n):
        img = photos[int(rng.integers(len(photos)))]
        h, w = img.shape
        side = max(4, int(round(min(h, w) * rng.uniform(0.1, 1.0))))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = img[None, None, top:top + side, left:left + side]
        out[i] = torch.nn.functional.interpolate(crop, size=(28, 28), mode="bilinear", antialias=True,
                                                 align_corners=False)[0]
    return out.clamp(0, 1).numpy()


def public_pretraining_images(seed: int, crops: int = 12000) -> np.ndarray:
    """Data the victim's owner does not own: ``crops`` natural-image crops (scikit-image photos) plus the 1797
    scikit-learn digits upscaled to 28x28 (bilinear). float32 ``[crops + 1797, 1, 28, 28]`` in [0, 1]."""
    digits = torch.from_numpy(load_digits_dataset().images)
    digits = torch.nn.functional.interpolate(digits, size=(28, 28), mode="bilinear", align_corners=False)
    return np.concatenate([_photo_crops(crops, seed), digits.clamp(0, 1).numpy()])


def _fashion_probe(module: torch.jit.ScriptModule, seed: int) -> float:
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    idx = np.random.default_rng(seed).permutation(len(train))[:10000]
    return linear_probe_accuracy(embed(module, train.images[idx]), train.labels[idx],
                                 embed(module, test.images), test.labels, seed=seed)


def build_public_backbone(seed: int, progress: bool) -> BuildResult:
    """A public foundation model in miniature: SimCLR (Chen et al. 2020) on :func:`public_pretraining_images`,
    no Fashion-MNIST. Same TorchScript interface as ``fashion-encoder``: ``[B,1,28,28]`` -> ``[B,128]``."""
    x = public_pretraining_images(seed)
    t0 = time.perf_counter()
    model, loss = train_simclr(x, steps=400, batch=256, temperature=0.5, seed=seed, progress=progress)
    seconds = time.perf_counter() - t0
    scripted = torch.jit.script(model)
    return scripted, {"arch": "FashionEncoder(conv16-32-64, fc128+BN; projector 128-128-64)",
                      "method": "SimCLR NT-Xent, temperature 0.5, batch 256, 400 steps",
                      "data": f"{len(x) - 1797} scikit-image photo crops + 1797 sklearn digits (28x28)",
                      "train_seconds": round(seconds, 2), "final_loss": round(loss, 4), "embedding_dim": 128,
                      "fashion_linear_probe_accuracy": round(_fashion_probe(scripted, seed), 4)}


#: Fine-tuning budget shared by the backbone-initialised and the from-scratch victims (same size, same steps).
VICTIM_EPOCHS, VICTIM_LR, VICTIM_TRUNK_LR_SCALE = 2, 3e-3, 0.1


def _build_encoder_classifier(seed: int, progress: bool, pretrained: bool) -> BuildResult:
    train = load_fashion_mnist("train")
    torch.manual_seed(seed)
    encoder = FashionEncoder()
    if pretrained:
        encoder.load_state_dict(dependency("public-backbone").state_dict())
    model = EncoderClassifier(encoder, num_classes=len(train.classes))
    trunk = [*model.body.parameters(), *model.fc.parameters()]
    t0 = time.perf_counter()
    fit_logits(model, model.logits, train.images, train.labels, epochs=VICTIM_EPOCHS, lr=VICTIM_LR, trunk=trunk,
               trunk_lr_scale=VICTIM_TRUNK_LR_SCALE if pretrained else 1.0, seed=seed, progress=progress,
               desc="fashion-finetuned" if pretrained else "fashion-scratch")
    seconds = time.perf_counter() - t0
    for p in model.parameters():
        p.requires_grad_(False)
    scripted = torch.jit.script(model)
    return scripted, {"arch": "EncoderClassifier(FashionEncoder trunk, relu-dropout-linear head, softmax)",
                      "init": "public-backbone" if pretrained else "random",
                      "recipe": f"AdamW one-cycle lr {VICTIM_LR}, {VICTIM_EPOCHS} epochs of 60000, batch 128, "
                                f"trunk lr x{VICTIM_TRUNK_LR_SCALE if pretrained else 1.0}",
                      "train_seconds": round(seconds, 2), "test_accuracy": round(_test_accuracy(scripted), 4),
                      "embedding_dim": 128, "classes": list(train.classes)}


def build_fashion_finetuned(seed: int, progress: bool) -> BuildResult:
    """Fashion-MNIST classifier fine-tuned from ``public-backbone``: ``[B,1,28,28]`` -> probabilities ``[B,10]``."""
    return _build_encoder_classifier(seed, progress, pretrained=True)


def build_fashion_scratch(seed: int, progress: bool) -> BuildResult:
    """``fashion-finetuned``'s architecture and budget from a random initialisation (the seed paper's contrast)."""
    return _build_encoder_classifier(seed, progress, pretrained=False)


register(ZooSpec("public-backbone", 1, "encoder", (1, 28, 28), 128, build_public_backbone,
                 description="SimCLR CNN encoder on scikit-image photo crops + sklearn digits (no Fashion-MNIST)"))
register(ZooSpec("fashion-finetuned", 2, "classifier", (1, 28, 28), 10, build_fashion_finetuned,
                 description="Fashion-MNIST classifier fine-tuned from public-backbone, softmax output"))
register(ZooSpec("fashion-scratch", 1, "classifier", (1, 28, 28), 10, build_fashion_scratch,
                 description="fashion-finetuned's architecture and budget trained from scratch"))

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


if __name__ == "__main__":
    raise SystemExit(main())
