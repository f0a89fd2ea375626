"""Watermark-aware thieves: wrappers that steal with a classifier attack, then try to shed the watermark
its answers carried before handing the copy over.

A DAWN-style mark is a small set of answers changed on purpose; a thief who knows that may run one of
the watermark removal attacks surveyed by Lukas, Jiang, Li, Kerschbaum, "SoK: How Robust is Image
Classification Deep Neural Network Watermarking?", IEEE S&P 2022:

- ``noise-robust``: treat the answers the thief's own copy disagrees with as label noise, drop them and
  train a fresh copy on the rest (the self-filtering of noisy-label learning: Northcutt, Jiang, Chuang,
  "Confident Learning: Estimating Uncertainty in Dataset Labels", JAIR 2021).
- ``distill``: label the thief's own pool with the first copy and train a fresh second copy on those
  labels only, so that no victim answer reaches it (Hinton, Vinyals, Dean, "Distilling the Knowledge in
  a Neural Network", 2015; the SoK's distillation removal attack).
- ``fine-tune``: fine-tune the copy on a few correctly labelled images (the FTAL removal attack of Adi
  et al., "Turning Your Weakness Into a Strength: Watermarking Deep Neural Networks by Backdooring",
  USENIX Security 2018).

Each wraps a base classifier attack (``knockoff``, ``fm-steal``, ``jbda``, ``copycat``) and trains with
that attack's own network and recipe (its ``new_copy`` and ``fit_copy``, early-stopped like every thief).
No wrapper sends a query beyond the inner attack's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from evaluation.attacks.base import (
    ATTACKS,
    AttackContext,
    AttackResult,
    create_attack,
    read_params,
)
from evaluation.attacks.thief import fit_images, snapshot
from evaluation.attacks.training import FitReport, predict
from evaluation.client import Refused

__all__ = ["Distill", "FineTune", "NoiseRobust", "Recorder"]

#: Seed offset of the second copies, so that copy 2 does not start from copy 1's initial weights.
_COPY2 = 7919


class Recorder:
    """A victim proxy that keeps every answered query: images float32 ``[n, C, H, W]`` and answers
    float32 ``[n, K]`` (a refused batch's partial answers too)."""

    def __init__(self, victim: Any) -> None:
        self.victim = victim
        self._x: list[np.ndarray] = []
        self._y: list[np.ndarray] = []

    @property
    def queries(self) -> int:
        return self.victim.queries

    @property
    def refused_after(self) -> int | None:
        return self.victim.refused_after

    def query(self, x: np.ndarray) -> np.ndarray:
        try:
            answers = self.victim.query(x)
        except Refused as error:
            if error.partial is not None and len(error.partial):
                self._keep(x[:len(error.partial)], error.partial)
            raise
        self._keep(x, answers)
        return answers

    def _keep(self, x: np.ndarray, answers: np.ndarray) -> None:
        self._x.append(np.array(x, dtype=np.float32))
        self._y.append(np.array(answers, dtype=np.float32))

    def answered(self) -> tuple[np.ndarray, np.ndarray]:
        """Every answered image and its answer, in the order they came."""
        if not self._x:
            return np.zeros((0, 0, 0, 0), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(self._x), np.concatenate(self._y)


class _Removal:
    """Runs the inner attack through a :class:`Recorder`, then :meth:`remove` turns its copy into the
    surrogate returned. Params: ``attack``, ``attack_params`` and the subclass's ``EXTRA``."""

    name, kind = "", "classifier"
    EXTRA: dict[str, Any] = {}
    CHOICES: dict[str, tuple[Any, ...]] = {}

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None:
        self.p = read_params(self.name, params, {"attack": "", "attack_params": {}, **self.EXTRA}, self.CHOICES)
        if not self.p["attack"]:
            raise ValueError(f"{self.name}.attack must name a classifier attack, got ''")
        self.inner = create_attack(self.p["attack"], self.p["attack_params"], seed=seed)
        if self.inner.kind != "classifier" or not hasattr(self.inner, "fit_copy"):
            raise ValueError(f"{self.name}.attack must name a classifier attack that trains its own copy "
                             f"(knockoff, fm-steal, jbda, copycat), got {self.p['attack']!r}")
        self.keys, self.seed = 1, seed

    def remove(self, ctx: AttackContext, first: nn.Module, x: np.ndarray,
               answers: np.ndarray) -> tuple[nn.Module, FitReport]:
        """The surrogate made from the inner attack's copy ``first`` and its answered queries."""
        raise NotImplementedError

    def run(self, ctx: AttackContext) -> AttackResult:
        recorder = Recorder(ctx.victim)
        first = self.inner.run(dataclasses.replace(ctx, victim=recorder))
        x, answers = recorder.answered()
        if not len(x):
            return first
        model, report = self.remove(ctx, first.surrogate, x, answers)
        model = model.cpu().eval()
        curve = first.curve[:-1] + [(first.queries, snapshot(model))]  # the curve ends at the copy returned
        training = [*first.training, {"stage": self.name, **report.as_dict(), **self.notes()}]
        return dataclasses.replace(first, surrogate=model, curve=curve, training=training)

    def notes(self) -> dict[str, Any]:
        """What the removal step did, for the report's ``training`` entry."""
        return {}

    def _pool_rows(self, ctx: AttackContext, n: int) -> np.ndarray:
        """``n`` distinct pool rows (all of them when the pool is smaller), seeded."""
        rng = np.random.default_rng(self.seed + _COPY2)
        return np.sort(rng.choice(len(ctx.pool), size=min(n, len(ctx.pool)), replace=False))


@ATTACKS.register("noise-robust")
class NoiseRobust(_Removal):
    """Noise-robust stealing: train copy 1 with the inner attack, drop every answer copy 1 disagrees with
    (argmax; the suspected watermark or noise labels), train a fresh copy 2 on the answers left with the
    inner attack's recipe (self-filtering, Northcutt et al., JAIR 2021; a removal attack in Lukas et al.,
    IEEE S&P 2022). Params: ``attack``, ``attack_params``."""

    name = "noise-robust"

    def remove(self, ctx: AttackContext, first: nn.Module, x: np.ndarray,
               answers: np.ndarray) -> tuple[nn.Module, FitReport]:
        self.kept = predict(first, x).argmax(1) == answers.argmax(1)
        model = self.inner.new_copy(ctx, self.seed + _COPY2)
        report = self.inner.fit_copy(model, x[self.kept], answers[self.kept], soft=self.inner.soft_labels,
                                     seed=self.seed + _COPY2, progress=ctx.progress, desc="noise-robust copy 2")
        return model, report

    def notes(self) -> dict[str, Any]:
        return {"dropped": int((~self.kept).sum())}


@ATTACKS.register("distill")
class Distill(_Removal):
    """A second-generation copy: train copy 1 with the inner attack, label ``images`` of the thief's pool
    with copy 1 (``labels`` soft: its probabilities, hard: its argmax), train a fresh copy 2 on those
    labels only and return it; copy 2 never sees a victim answer (Hinton et al. 2015; the distillation
    removal attack of Lukas et al., IEEE S&P 2022). ``images`` 0 takes as many as the victim answered.
    Params: ``attack``, ``attack_params``, ``images``, ``labels``."""

    name = "distill"
    EXTRA = {"images": 0, "labels": "soft"}
    CHOICES = {"labels": ("soft", "hard")}

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None:
        super().__init__(params, seed=seed)
        if self.p["images"] < 0:
            raise ValueError(f"distill.images must be >= 0 (0: as many as the victim answered), got {self.p['images']}")

    def remove(self, ctx: AttackContext, first: nn.Module, x: np.ndarray,
               answers: np.ndarray) -> tuple[nn.Module, FitReport]:
        images = fit_images(ctx.pool.images[self._pool_rows(ctx, self.p["images"] or len(x))], ctx.input_shape)
        teacher = torch.softmax(torch.from_numpy(predict(first, images)), dim=1).numpy()
        model = self.inner.new_copy(ctx, self.seed + _COPY2)
        report = self.inner.fit_copy(model, images, teacher, soft=self.p["labels"] == "soft",
                                     seed=self.seed + _COPY2, progress=ctx.progress, desc="distill copy 2")
        return model, report


@ATTACKS.register("fine-tune")
class FineTune(_Removal):
    """Fine-tuning on true labels: train the copy with the inner attack, then fine-tune all of it at ``lr``
    on ``labelled`` images of the thief's pool with their true labels (the pool's labels must be the
    model's classes, e.g. one Fashion-MNIST source), early-stopped on a held-out part of them (FTAL, Adi
    et al., USENIX Security 2018). Params: ``attack``, ``attack_params``, ``labelled``, ``lr``."""

    name = "fine-tune"
    EXTRA = {"labelled": 1000, "lr": 1e-3}

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None:
        super().__init__(params, seed=seed)
        if self.p["labelled"] < 1:
            raise ValueError(f"fine-tune.labelled must be >= 1, got {self.p['labelled']}")
        if self.p["lr"] <= 0:
            raise ValueError(f"fine-tune.lr must be > 0, got {self.p['lr']}")

    def remove(self, ctx: AttackContext, first: nn.Module, x: np.ndarray,
               answers: np.ndarray) -> tuple[nn.Module, FitReport]:
        labels = ctx.pool.labels
        if labels is None or len(labels) != len(ctx.pool) or int(labels.max()) >= ctx.num_outputs:
            raise ValueError("fine-tune needs a pool labelled with the model's classes (one labelled source)")
        rows = self._pool_rows(ctx, self.p["labelled"])
        images = fit_images(ctx.pool.images[rows], ctx.input_shape)
        truth = np.eye(ctx.num_outputs, dtype=np.float32)[labels[rows]]
        report = self.inner.fit_copy(first, images, truth, soft=False, seed=self.seed + _COPY2,
                                     progress=ctx.progress, desc="fine-tune", lr=self.p["lr"])
        return first, report
