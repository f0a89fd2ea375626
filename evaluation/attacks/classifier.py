"""Classifier-stealing attacks: ``knockoff``, ``jbda`` and ``copycat``.

Each trains a :class:`~evaluation.attacks.thief.ThiefCNN` on the victim's answers, reached only through
``ctx.victim`` (the gateway). Queries go out in stages; after each stage the thief trains on everything
answered so far (warm start) until its agreement with a held-out tenth of its own answers stops improving
(:mod:`evaluation.attacks.training`), and a snapshot is kept for the metric-vs-queries curve. A refusal
(blocked, throttled) ends the querying and the thief trains on what it got.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.attacks.base import ATTACKS, AttackContext, AttackResult, read_params
from evaluation.attacks.thief import ThiefCNN, fit_images, query_all, snapshot
from evaluation.attacks.training import (
    SCHEDULE,
    FitReport,
    StopRule,
    flip_and_shift,
    refuse_epochs,
    run_staged,
    train_on_answers,
)

__all__ = ["Copycat", "Jbda", "Knockoff"]

_TRAIN = {"stages": 4, "lr": 3e-3, "batch": 128, "width": 16, "chunk": 500, "augment": False, **SCHEDULE}


class _ThiefTrainer:
    """What the ThiefCNN attacks share: reading the training params, a fresh copy, training it on answers
    (:func:`~evaluation.attacks.training.train_on_answers`, early-stopped) and the staged attack loop.
    ``new_copy`` and ``fit_copy`` are also what the removal wrappers (:mod:`evaluation.attacks.removal`)
    train their second copies with."""

    name = ""
    soft_labels = False

    def _read(self, params: Mapping[str, Any], defaults: Mapping[str, Any],
              choices: Mapping[str, tuple[Any, ...]] | None = None) -> None:
        refuse_epochs(self.name, params)
        self.p = read_params(self.name, params, defaults, choices)
        self.rule = StopRule.read(self.name, self.p)
        for key in ("stages", "batch", "width", "chunk"):
            if key in self.p and self.p[key] < 1:
                raise ValueError(f"{self.name}.{key} must be >= 1, got {self.p[key]}")
        if self.p["lr"] <= 0:
            raise ValueError(f"{self.name}.lr must be > 0, got {self.p['lr']}")

    def new_copy(self, ctx: AttackContext, seed: int | None = None) -> torch.nn.Module:
        """A fresh ThiefCNN for ``ctx``'s input shape and classes, initialised from ``seed`` (the attack's)."""
        torch.manual_seed(self.seed if seed is None else seed)
        return ThiefCNN(ctx.input_shape, ctx.num_outputs, width=self.p["width"])

    def fit_copy(self, model: torch.nn.Module, x: np.ndarray, answers: np.ndarray, *, soft: bool, seed: int,
                 progress: bool, desc: str, lr: float | None = None) -> FitReport:
        """Train ``model`` (warm start) on images float32 ``[N, C, H, W]`` and answers float32 ``[N, K]``
        until its held-out agreement stops improving; ``lr`` overrides the attack's own."""
        return train_on_answers(model, x, answers, soft=soft, rule=self.rule, lr=lr or self.p["lr"],
                                batch=self.p["batch"], seed=seed, split_seed=self.seed,
                                augment=flip_and_shift if self.p.get("augment") else None, progress=progress,
                                desc=desc)

    def _staged(self, ctx: AttackContext, pick: Callable[[int, int, torch.nn.Module], np.ndarray],
                feedback: Callable[[np.ndarray, np.ndarray, torch.nn.Module], None] | None = None) -> AttackResult:
        """Query ``pick(stage, n, model)`` images per stage, train after each (warm start), snapshot."""
        model = self.new_copy(ctx)

        def fit(x: np.ndarray, y: np.ndarray, stage: int) -> FitReport:
            return self.fit_copy(model, x, y, soft=self.soft_labels, seed=self.seed + stage, progress=ctx.progress,
                                 desc=f"{self.name} training")

        return run_staged(ctx, model, self.p["stages"], self.p["chunk"], self.name,
                          lambda stage, n: pick(stage, n, model), fit,
                          None if feedback is None else lambda qx, qy: feedback(qx, qy, model))


class _GradientBandit:
    """Gradient bandit over pool categories (Sutton & Barto §2.8), as Knockoff's adaptive strategy."""

    def __init__(self, categories: np.ndarray, lr: float, rng: np.random.Generator) -> None:
        self.cats, self.index = np.unique(categories, return_inverse=True)
        self.members = [np.flatnonzero(self.index == k) for k in range(len(self.cats))]
        self.h = np.zeros(len(self.cats))
        self.lr, self.rng, self.baseline, self.seen = lr, rng, 0.0, 0

    def policy(self) -> np.ndarray:
        e = np.exp(self.h - self.h.max())
        return e / e.sum()

    def sample(self, n: int) -> np.ndarray:
        """Pool indices int64 ``[n]``: a category per query from the policy, then a member at random."""
        arms = self.rng.choice(len(self.cats), size=n, p=self.policy())
        return np.array([self.members[a][self.rng.integers(len(self.members[a]))] for a in arms], np.int64)

    def update(self, idx: np.ndarray, rewards: np.ndarray) -> None:
        """One averaged gradient-bandit step from per-query rewards float ``[n]`` of pool rows ``idx``."""
        pi, grad = self.policy(), np.zeros_like(self.h)
        for arm, r in zip(self.index[idx], rewards, strict=True):
            onehot = np.zeros_like(self.h)
            onehot[arm] = 1.0
            grad += (r - self.baseline) * (onehot - pi)
            self.seen += 1
            self.baseline += (r - self.baseline) / self.seen
        self.h += self.lr * grad / max(1, len(idx))


@ATTACKS.register("knockoff")
class Knockoff(_ThiefTrainer):
    """KnockoffNets: Orekondy, Schiele, Fritz, "Knockoff Nets: Stealing Functionality of Black-Box
    Models", CVPR 2019. Samples the thief's pool at random or adaptively (a gradient bandit over the
    pool's categories, rewarded by the thief's loss on the victim's answer) and trains on soft
    (probabilities) or hard (argmax) answers.

    Params: ``sampling`` random|adaptive, ``labels`` hard|soft, ``bandit_lr``, and the training
    params ``stages``, ``max_epochs``, ``patience``, ``val_fraction`` (per stage: see
    :mod:`evaluation.attacks.training`), ``lr``, ``batch``, ``width``, ``chunk``, ``augment``.
    """

    name, kind = "knockoff", "classifier"
    DEFAULTS = {"sampling": "random", "labels": "hard", "bandit_lr": 2.0, **_TRAIN}

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None:
        self.seed = seed
        self._read(params, self.DEFAULTS, {"sampling": ("random", "adaptive"), "labels": ("hard", "soft")})
        self.soft_labels = self.p["labels"] == "soft"

    def run(self, ctx: AttackContext) -> AttackResult:
        rng = np.random.default_rng(self.seed)
        pool = fit_images(ctx.pool.images, ctx.input_shape)
        if self.p["sampling"] == "random":
            order = rng.permutation(len(pool))
            if ctx.budget > len(pool):
                order = np.concatenate([order, rng.integers(len(pool), size=ctx.budget - len(pool))])
            cursor = [0]

            def pick(stage: int, n: int, model: torch.nn.Module) -> np.ndarray:
                cursor[0] += n
                return pool[order[cursor[0] - n:cursor[0]]]

            return self._staged(ctx, pick)
        if ctx.pool.labels is None:
            raise ValueError("knockoff.sampling=adaptive needs a query pool with category labels")
        bandit = _GradientBandit(ctx.pool.labels, self.p["bandit_lr"], rng)
        last: list[np.ndarray] = []

        def pick_adaptive(stage: int, n: int, model: torch.nn.Module) -> np.ndarray:
            last[:] = [bandit.sample(n)]
            return pool[last[0]]

        def feedback(qx: np.ndarray, qy: np.ndarray, model: torch.nn.Module) -> None:
            with torch.no_grad():
                logp = F.log_softmax(model.eval()(torch.from_numpy(qx)), dim=1).numpy()
            target = qy / np.clip(qy.sum(1, keepdims=True), 1e-8, None)
            rewards = -(target * logp).sum(1)
            bandit.update(last[0][:len(qy)], rewards / max(1e-8, float(rewards.std()) + 1.0))

        return self._staged(ctx, pick_adaptive, feedback)


def natural_crops(n: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """``n`` random crops of scikit-image's bundled photographs (10-100% of the short side, anywhere),
    resized with antialiasing to ``shape`` ``(C, H, W)``: float32 ``[n, C, H, W]`` in [0, 1]. Like
    :func:`evaluation.data.natural_image_crops`, with torch resizing (fast enough for query pools)."""
    from evaluation.data import _natural_photos

    short = 8 * max(int(shape[1]), int(shape[2]))  # photos shrunk once: the smallest crops keep ~their size

    def shrink(photo: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(photo.transpose(2, 0, 1)))[None]
        scale = min(1.0, short / min(t.shape[2:]))
        size = (max(1, round(t.shape[2] * scale)), max(1, round(t.shape[3] * scale)))
        return F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)[0]

    photos = [shrink(p) for p in _natural_photos()]
    out = np.empty((n, 3, int(shape[1]), int(shape[2])), np.float32)
    for i in range(n):
        img = photos[int(rng.integers(len(photos)))]
        h, w = img.shape[1:]
        side = max(4, int(round(min(h, w) * rng.uniform(0.1, 1.0))))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = img[None, :, top:top + side, left:left + side]
        out[i] = F.interpolate(crop, size=tuple(out.shape[2:]), mode="bilinear", antialias=True,
                               align_corners=False)[0].numpy()
    return fit_images(out, shape)


@ATTACKS.register("copycat")
class Copycat(_ThiefTrainer):
    """Copycat CNN: Correia-Silva et al., "Copycat CNN: Stealing Knowledge by Persuading Confession
    with Random Non-Labeled Data", IJCNN 2018. Queries random natural images from outside the
    problem domain (crops of scikit-image's photographs), optionally mixed with a fraction
    ``problem_domain`` of the suite's pool, and trains on the hard labels. Training params as
    :class:`Knockoff`'s."""

    name, kind = "copycat", "classifier"
    DEFAULTS = {"problem_domain": 0.0, **_TRAIN}

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None:
        self.seed = seed
        self._read(params, self.DEFAULTS)
        if not 0.0 <= self.p["problem_domain"] <= 1.0:
            raise ValueError(f"copycat.problem_domain must be in [0, 1], got {self.p['problem_domain']}")

    def run(self, ctx: AttackContext) -> AttackResult:
        rng = np.random.default_rng(self.seed)
        n_domain = int(round(ctx.budget * self.p["problem_domain"]))
        crops = natural_crops(ctx.budget - n_domain, ctx.input_shape, rng)
        domain = fit_images(ctx.pool.images[rng.choice(len(ctx.pool), n_domain)], ctx.input_shape)
        images = fit_images(np.concatenate([crops, domain]), ctx.input_shape)[rng.permutation(ctx.budget)]
        cursor = [0]

        def pick(stage: int, n: int, model: torch.nn.Module) -> np.ndarray:
            cursor[0] += n
            return images[cursor[0] - n:cursor[0]]

        return self._staged(ctx, pick)


@ATTACKS.register("jbda")
class Jbda(_ThiefTrainer):
    """Jacobian-based dataset augmentation: Papernot et al., "Practical Black-Box Attacks against
    Machine Learning", AsiaCCS 2017. A small labelled seed set grows each round by
    x' = clip(x + λ·sign(∇x F_sub(x)[ŷ])) with λ = ``step``·(−1)^⌊round/τ⌋ (doubling the set),
    hard labels; queries stop at the budget.

    Params: ``seed_size``, ``rounds``, ``step``, ``tau``, ``max_epochs``, ``patience``, ``val_fraction``
    (per round), ``lr``, ``batch``, ``width``, ``chunk``.
    """

    name, kind = "jbda", "classifier"
    DEFAULTS = {"seed_size": 150, "rounds": 6, "step": 0.1, "tau": 3, "lr": 3e-3, "batch": 128, "width": 16,
                "chunk": 500, **SCHEDULE}

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None:
        self.seed = seed
        self._read(params, self.DEFAULTS)
        for key in ("seed_size", "rounds", "tau"):
            if self.p[key] < 1:
                raise ValueError(f"jbda.{key} must be >= 1, got {self.p[key]}")

    def _grow(self, model: torch.nn.Module, x: np.ndarray, labels: np.ndarray, lam: float) -> np.ndarray:
        xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
        logits = model.eval()(xt)
        logits.gather(1, torch.from_numpy(labels).view(-1, 1)).sum().backward()
        return np.clip(x + lam * np.sign(xt.grad.numpy()), 0.0, 1.0).astype(np.float32)

    def run(self, ctx: AttackContext) -> AttackResult:
        rng = np.random.default_rng(self.seed)
        p = self.p
        seed_x = fit_images(ctx.pool.images[rng.choice(len(ctx.pool), min(p["seed_size"], ctx.budget))],
                            ctx.input_shape)
        model = self.new_copy(ctx)
        x, y, refused = query_all(ctx.victim.query, seed_x, chunk=p["chunk"], progress=ctx.progress,
                                  desc="jbda queries")
        refused_at = len(y) if refused else None
        curve: list[tuple[int, torch.nn.Module]] = []
        training: list[dict[str, Any]] = []
        for rnd in range(p["rounds"] + 1):
            if len(x):
                fit = self.fit_copy(model, x, y, soft=False, seed=self.seed + rnd, progress=ctx.progress,
                                    desc="jbda training")
                training.append({"stage": rnd + 1, **fit.as_dict()})
            curve.append((len(y), snapshot(model)))
            room = ctx.budget - len(y)
            if refused or rnd == p["rounds"] or room <= 0 or not len(x):
                break
            lam = p["step"] * (-1.0) ** (rnd // p["tau"])
            parents = rng.permutation(len(x))[:room]
            new_x = self._grow(model, x[parents], y[parents].argmax(1), lam)
            qx, qy, refused = query_all(ctx.victim.query, new_x, chunk=p["chunk"], progress=ctx.progress,
                                        desc="jbda queries")
            if len(qy):
                x, y = np.concatenate([x, qx]), np.concatenate([y, qy])
            if refused and refused_at is None:
                refused_at = len(y)
        return AttackResult(surrogate=model.eval(), queries=len(y), refused_after=refused_at, curve=curve,
                            training=training)
