"""Encoder-stealing attacks: params, losses, and a short attack through a real gateway (tiny victim)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from evaluation.attacks import AttackContext, create_attack
from evaluation.attacks.encoder import info_nce, soft_nn, stealing_loss
from evaluation.attacks.thief import ThiefCNN
from evaluation.client import VictimClient
from evaluation.data import ImageDataset, load_fashion_mnist
from evaluation.zoo_models import FashionEncoder, embed
from tests.evaluation.gateway_models import (
    API_KEY,
    OTHER_KEY,
    calibrated_encoder,
    serve,
)

ENCODER_ATTACKS = ("direct", "stolen-encoder", "cont-steal")


@pytest.mark.parametrize("name", ENCODER_ATTACKS)
def test_registered_with_defaults(name: str) -> None:
    attack = create_attack(name, {}, seed=0)
    assert attack.name == name and attack.kind == "encoder"


@pytest.mark.parametrize(("name", "params", "field"), [
    ("direct", {"loss": "cosine"}, "direct.loss"),
    ("direct", {"temperature": "hot"}, "direct.temperature"),
    ("direct", {"loss": "infonce", "temperature": 0}, "direct.temperature"),
    ("direct", {"max_epochs": 0}, "direct.max_epochs"),
    ("direct", {"epochs": 4}, "direct.epochs: thieves train until"),
    ("cont-steal", {"val_fraction": 0.9}, "cont-steal.val_fraction"),
    ("direct", {"lr": "fast"}, "direct.lr"),
    ("direct", {"bogus": 1}, "bogus"),
    ("stolen-encoder", {"views": 0}, "views"),
    ("stolen-encoder", {"lam": -1.0}, "lam"),
    ("cont-steal", {"min_scale": 1.5}, "cont-steal.min_scale"),
    ("cont-steal", {"augment": "yes"}, "cont-steal.augment"),
    ("cont-steal", {"temperature": -0.5}, "cont-steal.temperature"),
])
def test_bad_params_name_the_field(name: str, params: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        create_attack(name, params, seed=0)


def test_direct_temperature_defaults_per_loss() -> None:
    assert create_attack("direct", {"loss": "infonce"}, seed=0).p["temperature"] == 0.1
    assert create_attack("direct", {"loss": "softnn"}, seed=0).p["temperature"] == 0.5
    assert create_attack("direct", {"loss": "softnn", "temperature": 2}, seed=0).p["temperature"] == 2


def test_contrastive_losses_prefer_aligned_pairs() -> None:
    gen = torch.Generator().manual_seed(0)
    victim = torch.randn(64, 32, generator=gen)
    aligned = victim + 0.05 * torch.randn(64, 32, generator=gen)
    shuffled = aligned[torch.randperm(64, generator=gen)]
    for loss in (info_nce, soft_nn):
        assert loss(aligned, victim) < loss(shuffled, victim) - 1.0, loss.__name__
    # InfoNCE of perfectly aligned, well-separated pairs approaches 0; of random pairs, log(B).
    assert info_nce(victim, victim, 0.05) < 0.05
    assert abs(float(info_nce(torch.randn(64, 32, generator=gen), victim, 1e3)) - np.log(64)) < 0.01
    mse = stealing_loss("mse", 1.0)
    assert mse(victim, victim) == 0 and mse(aligned, victim) > 0
    with pytest.raises(ValueError, match="direct.loss"):
        stealing_loss("l1", 1.0)


def test_stolen_encoder_loss_rewards_matching_views() -> None:
    """The StolenEncoder loss is -(1 + lam) at its optimum (every view maps onto the victim's answer)."""
    attack = create_attack("stolen-encoder", {"lam": 2.0, "views": 3}, seed=0)
    x = torch.rand(8, 1, 28, 28)
    target = torch.randn(8, 16)

    class Constant(torch.nn.Module):  # maps every view of image i to target i
        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return target.repeat(len(v) // len(target), 1)

    gen = torch.Generator().manual_seed(0)
    assert float(attack.batch_loss(Constant(), x, target, gen)) == pytest.approx(-3.0, abs=1e-5)
    assert float(attack.batch_loss(Constant(), x, -target, gen)) == pytest.approx(3.0, abs=1e-5)


def _ctx(url: str, key: str, budget: int) -> AttackContext:
    test = load_fashion_mnist("test")
    pool = ImageDataset(images=np.ascontiguousarray(test.images[:2000]), labels=None, classes=())
    return AttackContext(victim=VictimClient(url, "victim-encoder", key, batch=128), kind="encoder",
                         input_shape=(1, 28, 28), num_outputs=32, budget=budget, seed=0, progress=False,
                         pool=pool, eval_x=test.images[5000:5500])


def _r2(victim: torch.nn.Module, copy: torch.nn.Module, x: np.ndarray) -> float:
    """Fraction of the victim's representation variance a linear map of the copy's explains (least squares)."""
    v, c = embed(victim, x).astype(np.float64), embed(copy, x).astype(np.float64)
    c1 = np.concatenate([c, np.ones((len(c), 1))], axis=1)
    fit = c1 @ np.linalg.lstsq(c1, v, rcond=None)[0]
    return float(1 - ((v - fit) ** 2).sum() / ((v - v.mean(0)) ** 2).sum())


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FashionEncoder]]:
    victim = calibrated_encoder(32)
    with serve(tmp_path_factory.mktemp("encoder-gateway"), {"victim-encoder": (victim, "encoder", 32)}) as url:
        yield url, victim


@pytest.mark.parametrize(("name", "params"), [("direct", {"loss": "mse"}), ("direct", {"loss": "infonce"}),
                                              ("stolen-encoder", {}), ("cont-steal", {})])
def test_attack_through_gateway_learns_the_victim(gateway: tuple[str, FashionEncoder], name: str,
                                                  params: dict) -> None:
    """600 queries through a real gateway: the copy explains clearly more of the victim's representation
    than an untrained copy does (R² of a linear fit: ~0.46 untrained, 0.58-0.69 after these attacks)."""
    url, victim = gateway
    torch.set_num_threads(1)
    ctx = _ctx(url, API_KEY, budget=600)
    # Batches of 32: at 128, 600 answers are 2-4 steps an epoch, too few for BatchNorm's running statistics
    # to follow, and the lagging held-out loss stops the copy after a few epochs.
    result = create_attack(name, {**params, "max_epochs": 20, "batch": 32, "stages": 2, "chunk": 200},
                           seed=0).run(ctx)
    refused = create_attack(name, params, seed=0).run(_ctx(url, OTHER_KEY, budget=600))
    held_out = ctx.eval_x
    assert result.queries == 600 == ctx.victim.queries and result.refused_after is None
    assert [q for q, _ in result.curve] == [300, 600]
    assert [t["stage"] for t in result.training] == [1, 2] and all(t["epochs"] <= 20 for t in result.training)
    assert not result.surrogate.training and embed(result.surrogate, held_out[:4]).shape == (4, 32)
    torch.manual_seed(1)
    untrained = _r2(victim, ThiefCNN((1, 28, 28), 32).eval(), held_out)
    learned = _r2(victim, result.surrogate, held_out)
    assert learned > untrained + 0.08, (untrained, learned)
    # an unknown key is refused at once: no queries, the refusal noted, a (useless) copy still returned
    assert refused.queries == 0 and refused.refused_after == 0 and len(refused.curve) == 1
