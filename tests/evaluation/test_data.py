"""Tests for evaluation.data: real Fashion-MNIST files, plus tiny fixtures in the real on-disk formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from evaluation import data
from evaluation.data import (
    DATASETS,
    DatasetNotFoundError,
    ImageDataset,
    load_cifar10,
    load_dataset,
    load_digits_dataset,
    load_fashion_mnist,
    load_image_folder,
    natural_image_crops,
)

FASHION_DIR = Path(data.DEFAULT_FASHION_MNIST_DIR)


def _write_idx(path: Path, arr: np.ndarray, magic_ndim: int | None = None) -> None:
    ndim = arr.ndim if magic_ndim is None else magic_ndim
    header = struct.pack(">HBB", 0, 0x08, ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _tiny_fashion(root: Path, n_test: int = 10000) -> None:
    """A fake Fashion-MNIST test split in the real IDX gzip format (the loader insists on 10000 x 28x28)."""
    images = (np.arange(n_test)[:, None, None] + np.arange(28 * 28).reshape(1, 28, 28)) % 256
    _write_idx(root / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)


@pytest.mark.parametrize(("split", "n"), [("train", 60000), ("test", 10000)])
def test_fashion_mnist_shapes_and_balance(split: str, n: int) -> None:
    ds = load_fashion_mnist(split)
    assert isinstance(ds, ImageDataset)
    assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == np.float32
    assert ds.labels is not None and ds.labels.shape == (n,) and ds.labels.dtype == np.int64
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0 and ds.images.max() > 0.99
    assert ds.labels.min() == 0 and ds.labels.max() == 9
    np.testing.assert_array_equal(np.bincount(ds.labels), np.full(10, n // 10))  # exactly balanced
    assert len(ds.classes) == 10 and ds.classes[9] == "Ankle boot"
    assert ds.shape == (1, 28, 28) and len(ds) == n


def test_fashion_mnist_cached_and_read_only() -> None:
    a, b = load_fashion_mnist("test"), load_fashion_mnist("test")
    assert a.images is b.images
    with pytest.raises(ValueError):
        a.images[0, 0, 0, 0] = 1.0
    with pytest.raises(ValueError):
        a.labels[0] = 3  # type: ignore[index]


def test_fashion_mnist_env_root_and_bad_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_fashion(tmp_path)
    monkeypatch.setenv("MOAT_FASHION_MNIST_DIR", str(tmp_path))
    ds = load_fashion_mnist("test")
    assert ds.images.shape == (10000, 1, 28, 28)
    np.testing.assert_array_equal(ds.labels[:12], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    with pytest.raises(ValueError, match="train.*test|test.*train"):
        load_fashion_mnist("validation")


def test_fashion_mnist_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="apt-get install") as info:
        load_fashion_mnist("train", root=tmp_path / "nope")
    assert isinstance(info.value, FileNotFoundError)
    assert "MOAT_FASHION_MNIST_DIR" in str(info.value)


@pytest.mark.parametrize("corruption", ["bad_magic", "wrong_count", "truncated", "not_gzip"])
def test_fashion_mnist_corrupt_idx_names_file(tmp_path: Path, corruption: str) -> None:
    _tiny_fashion(tmp_path)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    imgs = np.zeros((10000, 28, 28))
    if corruption == "bad_magic":
        _write_idx(bad, imgs, magic_ndim=2)
    elif corruption == "wrong_count":
        _write_idx(bad, imgs[:9999])
    elif corruption == "truncated":
        raw = gzip.decompress(bad.read_bytes())
        bad.write_bytes(gzip.compress(raw[:-100]))
    else:
        bad.write_bytes(b"this is not gzip at all")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_fashion_mnist("test", root=tmp_path)


def test_digits() -> None:
    ds = load_digits_dataset()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == np.float32
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert ds.labels is not None and set(np.unique(ds.labels)) == set(range(10))


def test_natural_crops_deterministic_and_in_range() -> None:
    a = natural_image_crops(40, seed=3)
    b = natural_image_crops(40, seed=3)
    c = natural_image_crops(40, seed=4)
    assert a.images.shape == (40, 1, 28, 28) and a.images.dtype == np.float32 and a.labels is None
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert a.images.min() >= 0.0 and a.images.max() <= 1.0
    assert a.images.reshape(40, -1).std(axis=1).mean() > 0.02  # real texture, not blank
    rgb = natural_image_crops(5, size=32, channels=3, seed=0)
    assert rgb.images.shape == (5, 3, 32, 32)
    assert len(data._natural_photos()) >= 8  # enough bundled photos load offline
    with pytest.raises(ValueError):
        natural_image_crops(3, channels=2)


def _write_cifar(root: Path, per_batch: int = 4) -> None:
    rng = np.random.default_rng(0)
    names = [f"c{i}".encode() for i in range(10)]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, per_batch).tolist()), b"batch_label": name.encode()}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_tiny_fixture(tmp_path: Path) -> None:
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    _write_cifar(base)
    train = load_cifar10(tmp_path)  # parent dir works too
    test = load_cifar10(base, split="test")
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.images.dtype == np.float32 and train.labels is not None and train.labels.dtype == np.int64
    assert train.classes == tuple(f"c{i}" for i in range(10))
    with open(base / "test_batch", "rb") as f:
        raw = pickle.load(f)
    # channel-major layout: first 1024 bytes are the red plane of image 0
    np.testing.assert_allclose(test.images[0, 0].ravel() * 255, raw[b"data"][0, :1024], atol=1e-3)
    with pytest.raises(ValueError, match="valid splits"):
        load_cifar10(base, split="val")


def test_cifar10_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="data_batch_1"):
        load_cifar10(tmp_path)
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(tmp_path)


def test_image_folder_tiny_fixture(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in (("cat", 2), ("dog", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            arr = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path)
    assert ds.images.shape == (5, 3, 12, 10) and ds.images.dtype == np.float32
    assert ds.classes == ("cat", "dog")
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 1])
    first = np.asarray(Image.open(tmp_path / "cat" / "0.png"), dtype=np.float32) / 255
    np.testing.assert_allclose(ds.images[0], first.transpose(2, 0, 1))
    gray = load_image_folder(tmp_path, size=8, channels=1)
    assert gray.images.shape == (5, 1, 8, 8)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "cat" / "odd.png")
    with pytest.raises(ValueError, match="odd.png"):
        load_image_folder(tmp_path)


def test_image_folder_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError):
        load_image_folder(tmp_path / "absent")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path)


def test_registry() -> None:
    assert {"fashion-mnist", "digits", "natural-crops", "cifar10", "image-folder"} <= set(DATASETS)
    assert len(load_dataset("natural-crops", n=3)) == 3
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("imagenet")
