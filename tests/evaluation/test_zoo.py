"""Tests for evaluation.zoo. The two real trainings (~45 s + ~100 s on 2 cores) run once per cache dir:
set MOAT_CACHE_DIR to share them with other tests and across runs; cache mechanics use a tiny dummy model."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import zoo  # noqa: E402
from evaluation.data import load_fashion_mnist  # noqa: E402
from evaluation.zoo_models import FashionEncoder, augment, embed, linear_probe_accuracy  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("MOAT_CACHE_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("moat-cache")


@pytest.fixture
def dummy() -> Iterator[str]:
    """A registered zoo entry whose 'training' is instant: Linear(4 -> 2)."""
    name = "test-dummy-linear"

    def build(seed: int, progress: bool) -> zoo.BuildResult:
        torch.manual_seed(seed)
        return torch.jit.script(torch.nn.Linear(4, 2).eval()), {"arch": "Linear(4,2)", "train_seconds": 0.0}

    zoo.register(zoo.ZooSpec(name, 3, "encoder", (1, 2, 2), 2, build, seed=7))
    yield name
    del zoo.ZOO[name]


def _probe(fn: object, n: int = 5000) -> float:
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    idx = np.random.default_rng(1).permutation(len(train))[:n]
    return linear_probe_accuracy(embed(fn, train.images[idx]), train.labels[idx],  # type: ignore[arg-type]
                                 embed(fn, test.images[:n]), test.labels[:n])


def test_registry_contents_and_errors() -> None:
    assert {"fashion-classifier", "fashion-encoder"} <= set(zoo.available())
    assert zoo.ZOO["fashion-classifier"].kind == "classifier" and zoo.ZOO["fashion-classifier"].output_dim == 10
    assert zoo.ZOO["fashion-encoder"].output_dim == 128
    with pytest.raises(ValueError, match="fashion-classifier.*fashion-encoder"):
        zoo.zoo_path("no-such-model")
    with pytest.raises(ValueError, match="fashion-classifier"):
        zoo.load_victim("no-such-model")
    with pytest.raises(ValueError, match="already registered"):
        zoo.register(zoo.ZOO["fashion-classifier"])


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOAT_CACHE_DIR", str(tmp_path))
    assert zoo.cache_root() == tmp_path
    assert zoo.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("MOAT_CACHE_DIR")
    assert zoo.cache_root() == Path("~/.cache/moat").expanduser()


def test_cache_build_reuse_and_sidecar(dummy: str, tmp_path: Path) -> None:
    before = zoo.BUILD_COUNTS[dummy]
    path = zoo.zoo_path(dummy, tmp_path, progress=False)
    assert path == tmp_path / f"{dummy}-3.pt" and zoo.BUILD_COUNTS[dummy] == before + 1
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["seed"] == 7 and meta["version"] == 3 and meta["arch"] == "Linear(4,2)" and len(meta["sha256"]) == 64
    mtime = path.stat().st_mtime_ns
    assert zoo.zoo_path(dummy, tmp_path) == path
    assert zoo.BUILD_COUNTS[dummy] == before + 1 and path.stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # no temp leftovers
    module = zoo.load_victim(dummy, tmp_path)
    assert not module.training and module(torch.zeros(3, 4)).shape == (3, 2)
    zoo.zoo_path(dummy, tmp_path, rebuild=True, progress=False)
    assert zoo.BUILD_COUNTS[dummy] == before + 2


@pytest.mark.parametrize("damage", ["truncate", "garbage_sidecar", "missing_sidecar"])
def test_corrupt_cache_is_rebuilt(dummy: str, tmp_path: Path, damage: str) -> None:
    path = zoo.zoo_path(dummy, tmp_path, progress=False)
    good = path.read_bytes()
    count = zoo.BUILD_COUNTS[dummy]
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage_sidecar":
        path.with_suffix(".json").write_text("{not json")
    else:
        path.with_suffix(".json").unlink()
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        assert zoo.zoo_path(dummy, tmp_path, progress=False) == path
    assert zoo.BUILD_COUNTS[dummy] == count + 1
    zoo.load_victim(dummy, tmp_path)  # loads again


def test_main_list_and_build(dummy: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert zoo.main(["list"]) == 0
    assert "fashion-encoder" in capsys.readouterr().out
    assert zoo.main(["--cache-dir", str(tmp_path), "build", dummy]) == 0
    assert (tmp_path / f"{dummy}-3.pt").is_file()
    with pytest.raises(SystemExit):
        zoo.main(["build", "no-such-model"])


def test_fashion_classifier(cache_dir: Path) -> None:
    model = zoo.load_victim("fashion-classifier", cache_dir)
    builds = zoo.BUILD_COUNTS["fashion-classifier"]
    test = load_fashion_mnist("test")
    probs = embed(model, test.images)
    assert probs.shape == (10000, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    accuracy = float((probs.argmax(1) == test.labels).mean())
    assert accuracy >= 0.85
    meta = zoo.metadata("fashion-classifier", cache_dir)
    assert abs(meta["test_accuracy"] - accuracy) < 1e-3 and meta["embedding_dim"] == 128
    with torch.no_grad():
        feats = model.features(torch.from_numpy(np.array(test.images[:8])))
    assert feats.shape == (8, 128) and feats.dtype == torch.float32
    assert zoo.BUILD_COUNTS["fashion-classifier"] == builds  # second lookup reused the cache


def test_fashion_encoder(cache_dir: Path) -> None:
    model = zoo.load_victim("fashion-encoder", cache_dir)
    builds = zoo.BUILD_COUNTS["fashion-encoder"]
    test = load_fashion_mnist("test")
    with torch.no_grad():
        out = model(torch.from_numpy(np.array(test.images[:16])))
    assert out.shape == (16, 128) and out.dtype == torch.float32 and torch.isfinite(out).all()
    accuracy = _probe(model)
    assert accuracy >= 0.70
    meta = zoo.metadata("fashion-encoder", cache_dir)
    assert meta["linear_probe_accuracy"] >= 0.75 and meta["embedding_dim"] == 128
    assert zoo.BUILD_COUNTS["fashion-encoder"] == builds


def test_fashion_encoder_learned_view_invariance(cache_dir: Path) -> None:
    """What SimCLR trains for, and a random-init encoder lacks: an augmented view retrieves its own image.

    (A linear probe alone is a weak check: random conv features already probe at ~80% on Fashion-MNIST.)
    """
    trained = zoo.load_victim("fashion-encoder", cache_dir)
    torch.manual_seed(0)
    with zoo.quiet_jit():
        random_init = torch.jit.script(FashionEncoder().eval())
    x = torch.from_numpy(np.array(load_fashion_mnist("test").images[:500]))
    gen = torch.Generator().manual_seed(0)
    v1, v2 = augment(x, gen), augment(x, gen)

    def top1(model: torch.jit.ScriptModule) -> float:
        with torch.no_grad():
            a = torch.nn.functional.normalize(model(v1), dim=1)
            b = torch.nn.functional.normalize(model(v2), dim=1)
        return float(((a @ b.T).argmax(1) == torch.arange(len(x))).float().mean())

    trained_acc, random_acc = top1(trained), top1(random_init)
    assert trained_acc > random_acc + 0.1, (trained_acc, random_acc)
