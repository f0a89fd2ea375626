"""``moat verify --config`` end to end: the demo gateway with its full default protection (B4B's
per-key transform and noise) and the region-shift watermark on the encoder; a thief that bought 8,000 embeddings
through it and fitted a copy is proven `stolen` on 20,000 fresh probes (images it never sent); an
encoder distilled from the clean victim without the gateway, and the clean victim itself, are
`not-proven`; bad invocations (and a model whose watermark keeps evidence instead) exit 2 naming
what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation.data import load_fashion_mnist
from evaluation.zoo import load_victim, zoo_path
from evaluation.zoo_models import FashionEncoder, embed
from tests.e2e.conftest import protected_config, query
from tests.e2e.copies import fit_copy, moat_cli
from tests.servers.procs import start_gateway

ENCODER = "fashion-encoder"
EPOCHS = 10


def _mse_copy(x: np.ndarray, targets: np.ndarray, seed: int) -> torch.jit.ScriptModule:
    return fit_copy(FashionEncoder, x, targets, lambda m, xb, tb: F.mse_loss(m(xb), tb), EPOCHS, seed)


def _region_shift(data: dict) -> None:
    """The demo protection, with the encoder's watermark the rule one (the demo default keeps evidence)."""
    encoder = next(m for m in data["models"] if m["name"] == ENCODER)
    encoder["watermark"] = {"name": "region-shift", "params": {"bits": 8, "rate": 0.25, "strength": 1.0}}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("verify-probes")
    state = {"name": "sqlite", "params": {"path": str(tmp / "state.db")}}
    config = protected_config(tmp / "gateway.yaml", state, edit=_region_shift)
    proc = start_gateway(config, tmp)
    proc.info["config"], proc.info["tmp"] = config, tmp
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def probes(gateway) -> Path:
    """Fashion-MNIST's test images and the last 10,000 training images, which no thief here sends."""
    path = gateway.info["tmp"] / "probes.npy"
    np.save(path, np.concatenate([load_fashion_mnist("test").images, load_fashion_mnist("train").images[50_000:]]))
    return path


def _verify(config: Path, model: str, suspect: Path, out: Path, *extra: str) -> dict:
    run = moat_cli("verify", "--config", str(config), "--model", model, "--suspect", str(suspect),
                   "-o", str(out), *extra)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert json.loads(run.stdout) == result
    return result


def test_a_copy_bought_through_the_gateway_is_proven_on_fresh_probes(gateway, probes) -> None:
    tmp, images = gateway.info["tmp"], load_fashion_mnist("train").images[:8000]
    answers = query(gateway, ENCODER, "erin", images, batch=500)  # erin's own B4B space, with noise
    copy = tmp / "erin.pt"
    _mse_copy(images, answers, seed=1).save(str(copy))
    result = _verify(gateway.info["config"], ENCODER, copy, tmp / "erin.json", "--probes", str(probes))
    assert result["watermark"] == "region-shift" and result["verdict"] == "stolen", result
    assert result["p_value"] < 1e-6 and result["n"] >= 20, result


def test_encoders_that_never_saw_the_gateway_are_not_proven(gateway, probes) -> None:
    tmp, images = gateway.info["tmp"], load_fashion_mnist("train").images[:8000]
    clean = embed(load_victim(ENCODER), images)  # distilled from the unmarked victim
    distilled = tmp / "distilled.pt"
    _mse_copy(images, clean, seed=2).save(str(distilled))
    for suspect in (distilled, zoo_path(ENCODER)):
        result = _verify(gateway.info["config"], ENCODER, Path(suspect), tmp / "independent.json",
                         "--probes", str(probes))
        assert result["verdict"] == "not-proven" and result["p_value"] > 0.01, (suspect, result)


def test_the_default_test_set_probes_and_alpha(gateway) -> None:
    result = _verify(gateway.info["config"], ENCODER, Path(zoo_path(ENCODER)), gateway.info["tmp"] / "v.json",
                     "--alpha", "0.001")
    assert result["probes_source"] == "fashion-mnist:test" and result["alpha"] == 0.001
    assert result["verdict"] == "not-proven" and result["n"] >= 20, result


@pytest.mark.parametrize(("args", "message"), [
    (("--model", ENCODER), "give --suspect"),
    (("--suspect", "x.pt"), "--config CONFIG --model NAME"),
    (("--model", "nope", "--suspect", "SUSPECT"), "no model 'nope'"),
    (("--model", "fashion-classifier", "--suspect", "SUSPECT"), "'dawn' is not proven on fresh probes"),
    (("--model", ENCODER, "--suspect", "SUSPECT", "--probes", "missing.npy"), "--probes missing.npy"),
])
def test_bad_invocations_exit_2_naming_the_problem(gateway, args: tuple[str, ...], message: str) -> None:
    suspect = str(zoo_path(ENCODER))
    run = moat_cli("verify", "--config", str(gateway.info["config"]), *(suspect if a == "SUSPECT" else a for a in args))
    assert run.returncode == 2 and message in run.stderr, run.stderr
