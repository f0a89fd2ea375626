"""Encoder-stealing attacks: ``direct``, ``stolen-encoder`` and ``cont-steal``.

Each queries images from the thief's pool through ``ctx.victim`` (the gateway), records the returned
representations and trains its own encoder (:class:`~evaluation.attacks.thief.ThiefCNN` with
``ctx.num_outputs`` outputs) to reproduce them. Queries go out in stages; after each stage the copy trains
on everything answered so far (warm start) until its own loss on a held-out tenth of the answers stops
falling (:mod:`evaluation.attacks.training`), and a snapshot is kept for the downstream-accuracy curve. A
refusal (blocked, throttled) ends the querying and the copy trains on what it got.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.attacks.base import ATTACKS, AttackContext, AttackResult, read_params
from evaluation.attacks.thief import ThiefCNN, fit_images
from evaluation.attacks.training import (
    SCHEDULE,
    FitReport,
    StopRule,
    fit_until_stale,
    held_out_split,
    refuse_epochs,
    run_staged,
)
from evaluation.zoo_models import augment, nt_xent

__all__ = ["ContSteal", "DirectExtraction", "StolenEncoder", "info_nce", "soft_nn", "stealing_loss"]

#: ``loss(copy's representations [B, D], victim's answers [B, D]) -> scalar``
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_TRAIN: dict[str, Any] = {"stages": 2, "lr": 3e-3, "batch": 128, "width": 16, "chunk": 500, **SCHEDULE}


def info_nce(copy: torch.Tensor, victim: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE over a batch: the copy's ``[B, D]`` row i must pick the victim's row i among all B rows by
    cosine similarity / ``temperature`` (cross-entropy, mean over rows)."""
    logits = F.normalize(copy, dim=1) @ F.normalize(victim, dim=1).t() / temperature
    return F.cross_entropy(logits, torch.arange(len(copy), device=copy.device))


def soft_nn(copy: torch.Tensor, victim: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Soft nearest-neighbour loss (Frosst, Papernot, Hinton, ICML 2019) as Dziedzic et al. use it for
    stealing: over the 2B L2-normalized representations ``[copy; victim]`` (each ``[B, D]``), the pair of
    one input is the only same-label pair; similarity is ``-||a - b||² / temperature``."""
    z = torch.cat([F.normalize(copy, dim=1), F.normalize(victim, dim=1)])
    n = len(copy)
    sim = -torch.cdist(z, z).pow(2) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def stealing_loss(name: str, temperature: float) -> Loss:
    """The direct-extraction loss ``name`` (``mse`` | ``infonce`` | ``softnn``) as ``loss(copy, victim)``."""
    if name == "mse":
        return F.mse_loss
    if name == "infonce":
        return lambda c, v: info_nce(c, v, temperature)
    if name == "softnn":
        return lambda c, v: soft_nn(c, v, temperature)
    raise ValueError(f"direct.loss must be one of ['mse', 'infonce', 'softnn'], got {name!r}")


class _EncoderAttack:
    """Shared querying and training; subclasses define :meth:`batch_loss`."""

    name = ""
    kind = "encoder"
    DEFAULTS: dict[str, Any] = {}
    CHOICES: dict[str, tuple[Any, ...]] = {}

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None:
        refuse_epochs(self.name, params)
        self.p = read_params(self.name, params, self.DEFAULTS, self.CHOICES)
        self.rule = StopRule.read(self.name, self.p)
        for key in ("stages", "batch", "width", "chunk"):
            if self.p[key] < 1:
                raise ValueError(f"{self.name}.{key} must be >= 1, got {self.p[key]}")
        for key in ("lr", "temperature"):
            if self.p.get(key) is not None and self.p[key] <= 0:
                raise ValueError(f"{self.name}.{key} must be > 0, got {self.p[key]}")
        self.seed = seed

    def batch_loss(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
        """Loss of ``model`` on images ``x`` ``[B, C, H, W]`` against victim answers ``target`` ``[B, D]``."""
        raise NotImplementedError

    def run(self, ctx: AttackContext) -> AttackResult:
        rng = np.random.default_rng(self.seed)
        pool = fit_images(ctx.pool.images, ctx.input_shape)
        order = rng.permutation(len(pool))
        if ctx.budget > len(pool):
            order = np.concatenate([order, rng.integers(len(pool), size=ctx.budget - len(pool))])
        torch.manual_seed(self.seed)
        model = ThiefCNN(ctx.input_shape, ctx.num_outputs, width=self.p["width"])
        sent = [0]

        def pick(stage: int, n: int) -> np.ndarray:
            sent[0] += n
            return pool[order[sent[0] - n:sent[0]]]

        def fit(x: np.ndarray, y: np.ndarray, stage: int) -> FitReport:
            return self._fit(model, x, y, stage, ctx.progress)

        return run_staged(ctx, model, self.p["stages"], self.p["chunk"], self.name, pick, fit)

    def _fit(self, model: nn.Module, x: np.ndarray, y: np.ndarray, stage: int, progress: bool) -> FitReport:
        """Train on images float32 ``[N, C, H, W]`` and answers float32 ``[N, D]`` (AdamW) until the
        attack's own loss on a held-out part of the answers stops falling."""
        p = self.p
        gen = torch.Generator().manual_seed(self.seed + stage)
        train, held = held_out_split(len(x), self.rule.val_fraction, self.seed)
        xt, yt = (torch.from_numpy(np.ascontiguousarray(a[train])) for a in (x, y))
        batch = min(p["batch"], len(xt))
        opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=1e-4)

        def epoch() -> None:
            perm = torch.randperm(len(xt), generator=gen)
            for i in range(max(1, len(xt) // batch)):  # whole batches: contrastive losses compare within one
                idx = perm[i * batch:(i + 1) * batch]
                loss = self.batch_loss(model, xt[idx], yt[idx], gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        def score() -> float:
            return -self.held_out_loss(model, x[held], y[held])

        return fit_until_stale(model, epoch, score if len(held) else None, self.rule, opt, examples=len(train),
                               progress=progress, desc=f"{self.name} training")

    @torch.no_grad()
    def held_out_loss(self, model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
        """Mean :meth:`batch_loss` of ``model`` (eval mode) on held-out images float32 ``[N, C, H, W]`` and
        answers ``[N, D]``, weighted by batch size. The batches and augmentations are the same every epoch,
        so epochs compare like with like (a short last batch has fewer negatives, the same each time)."""
        gen = torch.Generator().manual_seed(self.seed)
        total, count = 0.0, 0
        for i in range(0, len(x), self.p["batch"]):
            xb, yb = (torch.from_numpy(np.ascontiguousarray(a[i:i + self.p["batch"]])) for a in (x, y))
            if len(xb) >= 2 or count == 0:
                total, count = total + len(xb) * float(self.batch_loss(model, xb, yb, gen)), count + len(xb)
        return total / count


@ATTACKS.register("direct")
class DirectExtraction(_EncoderAttack):
    """Direct extraction: Dziedzic, Dhawan, Kaleem, Guan, Papernot, "On the Difficulty of Defending
    Self-Supervised Learning against Model Extraction", ICML 2022. The copy is trained to reproduce the
    victim's representation of each queried image with ``loss`` ``mse`` | ``infonce`` | ``softnn``.

    Params: ``loss``, ``temperature`` (InfoNCE / SoftNN; default 0.1 / 0.5), and the training params
    ``stages``, ``max_epochs``, ``patience``, ``val_fraction`` (per stage), ``lr``, ``batch``, ``width``,
    ``chunk``.
    """

    name = "direct"
    DEFAULTS = {"loss": "mse", "temperature": None, **_TRAIN}
    CHOICES = {"loss": ("mse", "infonce", "softnn")}

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None:
        temperature = params.get("temperature") if params else None
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
            raise ValueError(f"direct.temperature must be a number, got {temperature!r}")
        super().__init__(params, seed=seed)
        if self.p["temperature"] is None:
            self.p["temperature"] = {"mse": 1.0, "infonce": 0.1, "softnn": 0.5}[self.p["loss"]]
        self.loss = stealing_loss(self.p["loss"], float(self.p["temperature"]))

    def batch_loss(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
        return self.loss(model(x), target)


@ATTACKS.register("stolen-encoder")
class StolenEncoder(_EncoderAttack):
    """StolenEncoder: Liu, Jia, Liu, Gong, "StolenEncoder: Stealing Pre-trained Encoders in
    Self-supervised Learning", CCS 2022. Loss −cos(f̂(x), h(x)) − (λ/k)·Σᵢ cos(f̂(Aᵢ(x)), h(x)): ``views``
    (k) augmented views of each query reuse the victim's answer to the original, so augmentation costs
    no queries. Augmentations: random resized crop (``min_scale``), flip, brightness/contrast jitter.

    Params: ``lam`` (λ), ``views`` (k), ``min_scale``, and the training params as :class:`DirectExtraction`'s.
    """

    name = "stolen-encoder"
    DEFAULTS = {"lam": 1.0, "views": 1, "min_scale": 0.7, **_TRAIN}

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None:
        super().__init__(params, seed=seed)
        if self.p["lam"] < 0 or self.p["views"] < 1 or not 0 < self.p["min_scale"] <= 1:
            raise ValueError(f"stolen-encoder needs lam >= 0, views >= 1, 0 < min_scale <= 1; got "
                             f"lam={self.p['lam']}, views={self.p['views']}, min_scale={self.p['min_scale']}")

    def batch_loss(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
        k = self.p["views"]
        views = torch.cat([x, *(augment(x, gen, self.p["min_scale"]) for _ in range(k))])
        cos = F.cosine_similarity(model(views), target.repeat(k + 1, 1), dim=1).view(k + 1, len(x))
        return -cos[0].mean() - self.p["lam"] / k * cos[1:].mean(1).sum()


@ATTACKS.register("cont-steal")
class ContSteal(_EncoderAttack):
    """Cont-Steal: Sha, He, Yu, Backes, Zhang, "Can't Steal? Cont-Steal! Contrastive Stealing Attacks
    Against Image Encoders", CVPR 2023. NT-Xent (temperature 0.5): the copy's embedding of an augmented
    view of x and the victim's embedding of x are the positive pair; every other embedding of the batch
    (the copy's and the victim's) is a negative.

    Params: ``temperature``, ``min_scale`` (augmentation crop), ``augment`` (augment the copy's input),
    and the training params as :class:`DirectExtraction`'s.
    """

    name = "cont-steal"
    DEFAULTS = {"temperature": 0.5, "min_scale": 0.7, "augment": True, **_TRAIN}

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None:
        super().__init__(params, seed=seed)
        if not 0 < self.p["min_scale"] <= 1:
            raise ValueError(f"cont-steal.min_scale must be in (0, 1], got {self.p['min_scale']}")

    def batch_loss(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
        view = augment(x, gen, self.p["min_scale"]) if self.p["augment"] else x
        return nt_xent(model(view), target, self.p["temperature"])
