"""Offline dataset loaders for victims, thieves and detector calibration.

Every loader returns an :class:`ImageDataset`: ``images`` float32 ``[N, C, H, W]`` in ``[0, 1]``,
``labels`` int64 ``[N]`` (``None`` for unlabeled query pools) and the class names. Nothing here
downloads anything; this module deliberately does not import torch.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "FASHION_MNIST_CLASSES",
    "ImageDataset",
    "load_cifar10",
    "load_dataset",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "natural_image_crops",
]

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not on disk (nothing is ever downloaded)."""


@dataclass(frozen=True)
class ImageDataset:
    """Images float32 ``[N, C, H, W]`` in ``[0, 1]``; labels int64 ``[N]`` or ``None``; class names."""

    images: np.ndarray
    labels: np.ndarray | None
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.float32:
            raise ValueError(f"images must be float32 [N,C,H,W], got {self.images.dtype} {self.images.shape}")
        if self.labels is not None and (self.labels.shape != (len(self.images),) or self.labels.dtype != np.int64):
            raise ValueError(f"labels must be int64 [{len(self.images)}], got {self.labels.dtype} {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-image shape ``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


# ----------------------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: Path, expected_ndim: int, expected_count: int | None = None) -> np.ndarray:
    """Parse one gzip IDX file of unsigned bytes (magic ``0x0000 08 ndim``) into a uint8 array."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: not a readable gzip IDX file ({exc})") from exc
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    zero, dtype_code, ndim = int.from_bytes(raw[0:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08 or ndim != expected_ndim:
        raise ValueError(
            f"{path}: bad IDX magic {raw[:4].hex()} (expected 000008{expected_ndim:02x}: ubyte, {expected_ndim}-d)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if expected_count is not None and dims[0] != expected_count:
        raise ValueError(f"{path}: header says {dims[0]} items, expected {expected_count}")
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise ValueError(f"{path}: payload is {len(raw) - header} bytes, header dims {dims} need {size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=8)
def _fashion_cached(split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    img_name, lbl_name, count = _FASHION_FILES[split]
    base = Path(root)
    missing = [n for n in (img_name, lbl_name) if not (base / n).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found: missing {', '.join(str(base / n) for n in missing)}. "
            "Install it with `apt-get install -y dataset-fashion-mnist` (puts the IDX files in "
            f"{DEFAULT_FASHION_MNIST_DIR}), or set MOAT_FASHION_MNIST_DIR to a directory holding them."
        )
    images = _read_idx(base / img_name, 3, count)
    labels = _read_idx(base / lbl_name, 1, count)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{base / img_name}: images are {images.shape[1:]}, expected 28x28")
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{base / lbl_name}: label {int(labels.max())} out of range 0..9")
    x = (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    return _read_only(x), _read_only(labels.astype(np.int64))


def load_fashion_mnist(split: str = "train", root: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Fashion-MNIST (Xiao et al. 2017) from the IDX gzip files.

    Returns images float32 ``[N, 1, 28, 28]`` in ``[0, 1]`` and labels int64 ``[N]`` in ``0..9``
    (N = 60000 for ``"train"``, 10000 for ``"test"``). Arrays are cached per (split, root) and read-only.
    Root: ``root``, else ``$MOAT_FASHION_MNIST_DIR``, else ``/usr/share/datasets/fashion-mnist``.
    """
    if split not in _FASHION_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid splits: {sorted(_FASHION_FILES)}")
    if root is None:
        root = os.environ.get("MOAT_FASHION_MNIST_DIR") or DEFAULT_FASHION_MNIST_DIR
    x, y = _fashion_cached(split, str(Path(root).expanduser().resolve()))
    return ImageDataset(images=x, labels=y, classes=FASHION_MNIST_CLASSES)


# ----------------------------------------------------------------------------- scikit-learn digits
def load_digits_dataset() -> ImageDataset:
    """scikit-learn's bundled digits: 1797 images float32 ``[N, 1, 8, 8]`` in ``[0, 1]``, labels ``0..9``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    return ImageDataset(images=np.clip(x, 0.0, 1.0), labels=d.target.astype(np.int64),
                        classes=tuple(str(c) for c in d.target_names))


# ----------------------------------------------------------------------------- natural-image crops
_SKIMAGE_PHOTOS = (
    "astronaut", "camera", "coffee", "chelsea", "rocket", "page", "text", "moon", "coins", "horse",
    "hubble_deep_field", "immunohistochemistry", "motorcycle_left", "motorcycle_right", "grass",
    "gravel", "brick", "clock", "retina", "logo", "colorwheel", "cat",
)


@functools.lru_cache(maxsize=1)
def _natural_photos() -> tuple[np.ndarray, ...]:
    """Bundled scikit-image photos that load offline, as float32 RGB ``[H, W, 3]`` in ``[0, 1]``."""
    import skimage.data
    from skimage.util import img_as_float32

    photos = []
    for name in _SKIMAGE_PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        try:
            img = img_as_float32(np.asarray(loader()))
        except Exception:  # noqa: BLE001 - some loaders try to download (no network here)
            continue
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        elif img.ndim == 3 and img.shape[2] == 4:
            img = img[:, :, :3]
        if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 32:
            continue
        photos.append(_read_only(np.ascontiguousarray(np.clip(img, 0.0, 1.0))))
    if not photos:
        raise DatasetNotFoundError("no scikit-image bundled photographs could be loaded (is scikit-image installed?)")
    return tuple(photos)


def natural_image_crops(n: int, size: int = 28, channels: int = 1, seed: int = 0) -> ImageDataset:
    """``n`` random crops of scikit-image's bundled photos: float32 ``[n, channels, size, size]`` in ``[0, 1]``.

    Each crop picks a photo, a side length between 10% and 100% of the photo's short side and a
    position, then resizes to ``size x size`` (grayscale by luminance when ``channels == 1``,
    RGB when 3). Unlabeled (``labels=None``): an out-of-distribution query pool for thieves.
    Deterministic for a given seed.
    """
    if n < 0 or size < 1 or channels not in (1, 3):
        raise ValueError(f"need n >= 0, size >= 1, channels in (1, 3); got n={n}, size={size}, channels={channels}")
    from skimage.transform import resize

    photos = _natural_photos()
    rng = np.random.default_rng(seed)
    out = np.empty((n, channels, size, size), dtype=np.float32)
    lum = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
    for i in range(n):
        img = photos[int(rng.integers(len(photos)))]
        h, w = img.shape[:2]
        side = max(4, int(round(min(h, w) * rng.uniform(0.1, 1.0))))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = img[top:top + side, left:left + side]
        if channels == 1:
            crop = crop @ lum
        small = resize(crop, (size, size), order=1, anti_aliasing=side > size, preserve_range=True)
        small = small.reshape(size, size, channels) if channels == 1 else small
        out[i] = np.clip(np.transpose(small, (2, 0, 1)), 0.0, 1.0)
    return ImageDataset(images=out, labels=None, classes=())


# ----------------------------------------------------------------------------- CIFAR-10 / ImageFolder
def load_cifar10(root: str | os.PathLike[str], split: str = "train") -> ImageDataset:
    """CIFAR-10 in the standard python pickle format (``data_batch_1..5``, ``test_batch``, ``batches.meta``).

    ``root`` is the ``cifar-10-batches-py`` directory (or its parent). Returns images float32
    ``[N, 3, 32, 32]`` in ``[0, 1]`` and labels int64 ``[N]``.
    """
    splits = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    if split not in splits:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; valid splits: {sorted(splits)}")
    base = Path(root).expanduser()
    if not (base / "batches.meta").is_file() and (base / "cifar-10-batches-py" / "batches.meta").is_file():
        base = base / "cifar-10-batches-py"
    needed = ["batches.meta", *splits[split]]
    missing = [n for n in needed if not (base / n).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found under {base}: missing {', '.join(missing)} "
            "(expected the python-format 'cifar-10-batches-py' directory; nothing is downloaded)"
        )

    def unpickle(name: str) -> dict[str, Any]:
        try:
            with open(base / name, "rb") as f:
                d = pickle.load(f, encoding="bytes")
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{base / name}: not a CIFAR-10 pickle ({exc})") from exc
        if not isinstance(d, dict):
            raise ValueError(f"{base / name}: not a CIFAR-10 pickle (top level is {type(d).__name__})")
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}

    meta = unpickle("batches.meta")
    if "label_names" not in meta:
        raise ValueError(f"{base / 'batches.meta'}: no 'label_names' entry")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"])
    xs, ys = [], []
    for name in splits[split]:
        d = unpickle(name)
        if "data" not in d or "labels" not in d:
            raise ValueError(f"{base / name}: missing 'data' or 'labels'")
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d["labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
            raise ValueError(f"{base / name}: data {data.shape} / labels {labels.shape}, expected [N,3072] / [N]")
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(f"{base / name}: labels out of range 0..{len(classes) - 1}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    x = np.concatenate(xs).astype(np.float32) / np.float32(255.0)
    return ImageDataset(images=x, labels=np.concatenate(ys), classes=classes)


def load_image_folder(root: str | os.PathLike[str], size: int | tuple[int, int] | None = None,
                      channels: int | None = None) -> ImageDataset:
    """An ImageFolder tree ``root/<class_name>/*.{png,jpg,...}``; classes sorted by name.

    Returns images float32 ``[N, C, H, W]`` in ``[0, 1]`` and labels int64 ``[N]``. All images must share
    one size unless ``size`` (``(H, W)`` or a side) is given, which resizes them. ``channels`` (1 or 3)
    forces grayscale/RGB; by default RGB unless every image is grayscale.
    """
    from PIL import Image

    base = Path(root).expanduser()
    if not base.is_dir():
        raise DatasetNotFoundError(f"image folder {base} does not exist")
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(f, ci) for ci, d in enumerate(class_dirs) for f in sorted(d.iterdir())
             if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"{base}: no images found (expected {base}/<class_name>/*.png|jpg)")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels}")
    target = (size, size) if isinstance(size, int) else size
    pics: list[Image.Image] = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
                pics.append(im.copy())
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{f}: cannot read image ({exc})") from exc
    if channels is None:
        channels = 1 if all(p.mode in ("L", "1", "I;16", "I") for p in pics) else 3
    arrays = []
    for (f, _), im in zip(files, pics, strict=True):
        im = im.convert("L" if channels == 1 else "RGB")
        if target is not None:
            im = im.resize((target[1], target[0]), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float32) / np.float32(255.0)
        a = a[None] if channels == 1 else a.transpose(2, 0, 1)
        if arrays and a.shape != arrays[0].shape:
            raise ValueError(f"{f}: size {a.shape[1:]} differs from {arrays[0].shape[1:]}; pass size=")
        arrays.append(a)
    return ImageDataset(images=np.stack(arrays).astype(np.float32),
                        labels=np.array([ci for _, ci in files], dtype=np.int64),
                        classes=tuple(d.name for d in class_dirs))


# ----------------------------------------------------------------------------- registry
DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits_dataset,
    "natural-crops": natural_image_crops,
    "cifar10": load_cifar10,
    "image-folder": load_image_folder,
}


def load_dataset(name: str, **kwargs: Any) -> ImageDataset:
    """Load a dataset by registry name (see :data:`DATASETS`), passing ``kwargs`` to its loader."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {sorted(DATASETS)}") from None
    return loader(**kwargs)
