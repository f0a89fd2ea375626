"""Wrappers that turn any attack into a stronger one: ``sybil`` (many API keys) and ``averaging``
(repeat or jitter each query and average the answers). Both build the inner attack with
:func:`~evaluation.attacks.base.create_attack` and hand it an altered ``ctx.victim``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from evaluation.attacks.base import (
    ATTACKS,
    AttackContext,
    AttackResult,
    create_attack,
    read_params,
)
from evaluation.client import KeyPool, Refused

__all__ = ["Averaging", "MappedPool", "Sybil", "fit_affine"]


def fit_affine(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares affine map (minimum-norm, so constant or collinear columns are harmless) from
    ``source`` float ``[n, d]`` to ``target`` ``[n, e]``; returns ``W`` float32 ``[d + 1, e]`` applied as
    ``[x, 1] @ W``."""
    a = np.hstack([source, np.ones((len(source), 1))]).astype(np.float64)
    w, *_ = np.linalg.lstsq(a, target.astype(np.float64), rcond=None)
    return w.astype(np.float32)


def _apply(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (np.hstack([x, np.ones((len(x), 1), np.float32)]) @ w).astype(np.float32)


class MappedPool:
    """A victim proxy over a :class:`KeyPool` whose answers from key i are mapped into key 0's answer
    space by affine maps learned from anchor images that every key answered (B4B's per-key
    transforms put each sybil's answers in its own space; the mapping is what pooling them costs)."""

    def __init__(self, pool: KeyPool, maps: list[np.ndarray | None]) -> None:
        self.pool, self.maps = pool, maps

    @property
    def queries(self) -> int:
        return self.pool.queries

    @property
    def refused_after(self) -> int | None:
        return self.pool.refused_after

    def query(self, x: np.ndarray) -> np.ndarray:
        """Answers float32 ``[N, K]`` in key 0's space; :class:`Refused` partials are mapped too."""
        try:
            answers = self.pool.query(x)
        except Refused as error:
            if error.partial is not None and len(error.partial):
                keys = self.pool.last_keys[:len(error.partial)]
                error.partial = self._map(error.partial, keys)
            raise
        return self._map(answers, self.pool.last_keys)

    def _map(self, answers: np.ndarray, keys: np.ndarray) -> np.ndarray:
        out = np.array(answers, dtype=np.float32)
        for k, w in enumerate(self.maps):
            rows = keys[:len(out)] == k
            if w is not None and rows.any():
                out[rows] = _apply(w, out[rows])
        return out


def learn_maps(pool: KeyPool, anchors: np.ndarray) -> list[np.ndarray | None]:
    """Query ``anchors`` float32 ``[n, C, H, W]`` through every key; the affine map of each key's answers
    onto key 0's (``None`` for key 0). Costs ``n`` queries per key."""
    answers = [client.query(anchors) for client in pool.clients]
    return [None] + [fit_affine(a, answers[0]) for a in answers[1:]]


@ATTACKS.register("sybil")
class Sybil:
    """Sybil attack: the inner attack's queries are spread round-robin over ``keys`` API keys so that no
    single key looks suspicious (Dubiński et al., "Bucks for Buckets (B4B)", NeurIPS 2023, §4 discuss
    it as the adaptive attack per-key defenses must answer). With ``mapping`` (encoders), ``anchors``
    images are first queried through every key and the answers of keys 1..k-1 are mapped onto key 0's
    space by least squares before the inner attack sees them (the step B4B's per-key transforms make
    necessary). Params: ``attack``, ``attack_params``, ``keys``, ``mapping`` auto|on|off, ``anchors``.
    """

    name, kind = "sybil", "any"
    DEFAULTS = {"attack": "", "attack_params": {}, "keys": 4, "mapping": "auto", "anchors": 300}

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None:
        self.p = read_params(self.name, params, self.DEFAULTS, {"mapping": ("auto", "on", "off")})
        if not self.p["attack"] or self.p["attack"] in ("sybil", "averaging"):
            raise ValueError(f"sybil.attack must name a base attack, got {self.p['attack']!r}")
        if self.p["keys"] < 2:
            raise ValueError(f"sybil.keys must be >= 2, got {self.p['keys']}")
        if self.p["anchors"] < 1:
            raise ValueError(f"sybil.anchors must be >= 1, got {self.p['anchors']}")
        self.inner = create_attack(self.p["attack"], self.p["attack_params"], seed=seed)
        self.keys, self.seed = int(self.p["keys"]), seed

    def run(self, ctx: AttackContext) -> AttackResult:
        if not isinstance(ctx.victim, KeyPool) or len(ctx.victim.clients) != self.keys:
            raise ValueError(f"sybil needs a KeyPool of {self.keys} keys as ctx.victim")
        mapping = self.p["mapping"] == "on" or (self.p["mapping"] == "auto" and ctx.kind == "encoder")
        victim: Any = ctx.victim
        spent = 0
        if mapping:
            rng = np.random.default_rng(self.seed)
            from evaluation.attacks.thief import fit_images
            n = min(self.p["anchors"], max(1, ctx.budget // (2 * self.keys)))
            anchors = fit_images(ctx.pool.images[rng.choice(len(ctx.pool), n, replace=False)], ctx.input_shape)
            try:
                maps = learn_maps(ctx.victim, anchors)
            except Refused:
                return self.inner.run(dataclasses.replace(ctx, budget=0))
            spent = ctx.victim.queries
            victim = MappedPool(ctx.victim, maps)
        result = self.inner.run(dataclasses.replace(ctx, victim=victim, budget=max(0, ctx.budget - spent)))
        curve = [(q + spent, m) for q, m in result.curve]
        return dataclasses.replace(result, queries=result.queries + spent, curve=curve,
                                   refused_after=ctx.victim.refused_after)


class _Averaged:
    """A victim proxy that sends each image ``repeats`` times (with uniform pixel jitter ``jitter``
    on the copies after the first) and answers with the mean."""

    def __init__(self, victim: Any, repeats: int, jitter: float, rng: np.random.Generator) -> None:
        self.victim, self.repeats, self.jitter, self.rng = victim, repeats, jitter, rng

    @property
    def queries(self) -> int:
        return self.victim.queries

    @property
    def refused_after(self) -> int | None:
        return self.victim.refused_after

    def query(self, x: np.ndarray) -> np.ndarray:
        """Mean answer float32 ``[N, K]`` over the repeats of each image ``[N, C, H, W]``."""
        reps = np.repeat(np.asarray(x, np.float32), self.repeats, axis=0)
        if self.jitter > 0:
            noise = self.rng.uniform(-self.jitter, self.jitter, reps.shape).astype(np.float32)
            noise[:: self.repeats] = 0.0
            reps = np.clip(reps + noise, 0.0, 1.0)
        try:
            answers = self.victim.query(reps)
        except Refused as error:
            whole = 0 if error.partial is None else len(error.partial) // self.repeats * self.repeats
            error.partial = self._mean(error.partial[:whole]) if whole else np.zeros((0, 0), np.float32)
            raise
        return self._mean(answers)

    def _mean(self, answers: np.ndarray) -> np.ndarray:
        return answers.reshape(-1, self.repeats, answers.shape[1]).mean(axis=1).astype(np.float32)


@ATTACKS.register("averaging")
class Averaging:
    """Noise averaging: ask each query ``repeats`` times (``jitter`` > 0: nearly the same query, pixels
    moved by up to ±jitter) and average the answers, which defeats perturbations redrawn per call
    (the counter-attack named by Orekondy et al., "Prediction Poisoning", ICLR 2020, and by BESA
    2025). The inner attack gets ``budget // repeats`` distinct queries.
    Params: ``attack``, ``attack_params``, ``repeats``, ``jitter``.
    """

    name, kind = "averaging", "any"
    DEFAULTS = {"attack": "", "attack_params": {}, "repeats": 4, "jitter": 0.0}

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None:
        self.p = read_params(self.name, params, self.DEFAULTS)
        if not self.p["attack"] or self.p["attack"] in ("sybil", "averaging"):
            raise ValueError(f"averaging.attack must name a base attack, got {self.p['attack']!r}")
        if self.p["repeats"] < 2:
            raise ValueError(f"averaging.repeats must be >= 2, got {self.p['repeats']}")
        if not 0.0 <= self.p["jitter"] <= 0.5:
            raise ValueError(f"averaging.jitter must be in [0, 0.5], got {self.p['jitter']}")
        self.inner = create_attack(self.p["attack"], self.p["attack_params"], seed=seed)
        self.keys = 1
        self.seed = seed

    def run(self, ctx: AttackContext) -> AttackResult:
        proxy = _Averaged(ctx.victim, int(self.p["repeats"]), self.p["jitter"], np.random.default_rng(self.seed))
        result = self.inner.run(dataclasses.replace(ctx, victim=proxy, budget=ctx.budget // self.p["repeats"]))
        curve = [(q * self.p["repeats"], m) for q, m in result.curve]
        return dataclasses.replace(result, queries=ctx.victim.queries, refused_after=ctx.victim.refused_after,
                                   curve=curve)
