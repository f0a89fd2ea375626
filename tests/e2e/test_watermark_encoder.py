"""The direction watermark end to end on the demo encoder: thieves that train copies on 10,000
answers from the gateway (MSE loss, cosine loss) are verified `stolen` from the evidence exported
with `moat evidence export`; encoders trained without the gateway (SimCLR, and a copy distilled
from the clean victim) are `not-proven`; an honest user's linear probe loses at most r + 0.2
points."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from evaluation.data import load_fashion_mnist
from evaluation.zoo import load_victim
from evaluation.zoo_models import (
    FashionEncoder,
    embed,
    linear_probe_accuracy,
    train_simclr,
)
from gateway.evidence import load_evidence
from gateway.verify import verify
from tests.e2e.conftest import protected_config, query
from tests.e2e.copies import evidence_watermark_only, fit_copy, moat_cli
from tests.servers.procs import start_gateway

MODEL = "fashion-encoder"
RATE = 0.005
# The mark grows with the thief's fit. Measured on the demo key (MSE / cosine thief): 5 epochs,
# p = 3e-5 / 6e-4; 10 epochs, p = 1e-18 / 6e-13 (~2 s per epoch on one thread).
EPOCHS = 10


def _train(x: np.ndarray, targets: np.ndarray, loss: str, epochs: int, seed: int) -> torch.jit.ScriptModule:
    """A FashionEncoder fitted to the answers float32 [N, 128] with MSE or cosine loss."""
    def fit(m: torch.nn.Module, xb: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        z = m(xb)
        return F.mse_loss(z, tb) if loss == "mse" else 1 - F.cosine_similarity(z, tb).mean()

    return fit_copy(FashionEncoder, x, targets, fit, epochs, seed)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Train and probe on one thread: on 2 cores shared with the gateway (and other work), two
    torch or BLAS threads spin against each other (measured: a thief epoch took 40-50 s on two
    threads, 2.7 s on one; the lbfgs probe 30 s against 1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("direction")
    state = {"name": "sqlite", "params": {"path": str(tmp / "state.db")}}
    config = protected_config(tmp / "direction.yaml", state, models=[MODEL], edit=evidence_watermark_only)
    proc = start_gateway(config, tmp)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def train_images() -> np.ndarray:
    return load_fashion_mnist("train").images


@pytest.fixture(scope="module")
def thieves(gateway, train_images, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per thief (erin: MSE, frank: cosine loss; 10,000 training images each, disjoint): its
    evidence file (exported with the CLI) and its TorchScript copy."""
    tmp, out = tmp_path_factory.mktemp("thieves"), {}
    for client, loss, rows in (("erin", "mse", slice(0, 10_000)), ("frank", "cosine", slice(10_000, 20_000))):
        images = train_images[rows]
        answers = query(gateway, MODEL, client, images, batch=500)
        copy, evidence = tmp / f"{client}.pt", tmp / f"{client}.json"
        _train(images, answers, loss, epochs=EPOCHS, seed=1).save(str(copy))
        run = moat_cli("evidence", "export", "--client", client, "-o", str(evidence),
                    "--admin", f"127.0.0.1:{gateway.info['admin']}", "--token", "test-admin-token")
        assert run.returncode == 0, run.stderr
        out[client] = (evidence, copy)
    return out


@pytest.mark.parametrize("client", ["erin", "frank"])
def test_thief_copies_are_verified_stolen(thieves, client: str, tmp_path: Path) -> None:
    evidence, copy = thieves[client]
    result_file = tmp_path / "result.json"
    run = moat_cli("verify", "--evidence", str(evidence), "--suspect", str(copy), "-o", str(result_file))
    assert run.returncode == 0, run.stderr
    result = json.loads(result_file.read_text())
    print(f"{client}: {result}")
    assert result == json.loads(run.stdout) and result["watermark"] == "direction"
    assert 25 <= result["n"] <= 80  # r = 0.5% of 10,000 answers, repeated codes counted once
    assert result["verdict"] == "stolen" and result["p_value"] < 0.001, result


def test_independent_encoders_are_not_proven(thieves, train_images) -> None:
    """Five SimCLR encoders (a few steps, one seed each), and a copy distilled from the clean
    victim's answers (as close to the victim as the thieves' copies, but without the watermark)."""
    evidence = load_evidence(thieves["erin"][0].read_bytes())
    rows = slice(20_000, 30_000)
    clean = embed(load_victim(MODEL), train_images[rows])
    suspects = {"distilled": _train(train_images[rows], clean, "mse", epochs=EPOCHS, seed=2)}
    for seed in range(5):
        suspects[f"simclr-{seed}"] = train_simclr(train_images[rows], steps=20, seed=100 + seed, progress=False)[0]
    for name, model in suspects.items():
        result = verify(evidence, lambda x, model=model: embed(model, x))
        print(f"independent {name}: {result}")
        assert result["verdict"] == "not-proven" and result["p_value"] > 0.05, (name, result)


def test_the_gateway_behind_an_endpoint_carries_its_watermark(gateway, thieves) -> None:
    """Endpoint mode: the gateway itself, as the suspect, answers every evidence query with its mark."""
    run = moat_cli("verify", "--evidence", str(thieves["frank"][0]), "--suspect-endpoint",
                f"127.0.0.1:{gateway.info['grpc']}", "--model", MODEL, "--api-key", "alice-test-key")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["matches"] == result["n"] and result["mean_cos"] > 0.9 and result["verdict"] == "stolen"


def test_a_suspect_of_another_dimension_gives_an_error(thieves, tmp_path: Path) -> None:
    class Narrow(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :64]

    narrow = tmp_path / "narrow.pt"
    torch.jit.script(Narrow()).save(str(narrow))
    run = moat_cli("verify", "--evidence", str(thieves["erin"][0]), "--suspect", str(narrow))
    assert run.returncode == 1 and "dimension 64" in run.stderr and "dimension 128" in run.stderr, run.stderr
    assert "verdict" not in run.stdout


def test_honest_probe_drop_is_at_most_r_plus_0_2_points(gateway, train_images) -> None:
    """A linear probe fitted and tested on answers through the gateway, against the same probe on
    the clean victim's answers (10,000 train images unseen by the thieves, the 10,000 test images)."""
    test = load_fashion_mnist("test")
    labels = load_fashion_mnist("train").labels[30_000:40_000]
    train, victim = train_images[30_000:40_000], load_victim(MODEL)
    served = [query(gateway, MODEL, "grace", x, batch=500) for x in (train, test.images)]
    clean = linear_probe_accuracy(embed(victim, train), labels, embed(victim, test.images), test.labels)
    through = linear_probe_accuracy(served[0], labels, served[1], test.labels)
    print(f"honest linear probe: clean {clean:.4f}, through the gateway {through:.4f}")
    assert (clean - through) * 100 <= RATE * 100 + 0.2
