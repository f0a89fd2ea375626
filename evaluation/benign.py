"""Honest users: clients that solve one downstream task through the gateway, at realistic volumes.

- classifier: the user labels images of a few classes (or all of them, a broad user); utility = the
  accuracy of the answers' argmax restricted to the user's classes.
- encoder: the user embeds its own labelled images, trains a linear probe on ``train_fraction`` of
  them and embeds the rest to test it; utility = the probe's accuracy. (Under B4B each key lives in its
  own transformed space, which a probe trained in that space does not notice.)

A user with ``passes`` > 1 sends its images that many times (retries, a second scoring run), and
utility is measured on the answers of every pass: a defense that turns on a user once it repeats
itself shows in the later passes' answers. An encoder user's probe trains on every pass's answers
of its training images and is tested on every pass's answers of the others.

Queries the gateway refuses count as failures: an honest user who is blocked loses those answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evaluation.attacks.thief import query_all
from evaluation.data import ImageDataset
from evaluation.suite import BenignSpec

__all__ = ["BenignResult", "run_benign", "task_images"]


@dataclass(frozen=True)
class BenignResult:
    """``utility`` in [0, 1]; ``queries`` answered; ``refused_after`` query index of a refusal, else None."""

    utility: float
    queries: int
    refused_after: int | None


def task_images(spec: BenignSpec, data: ImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """The user's ``spec.queries`` images float32 ``[n, C, H, W]`` and labels int64 ``[n]`` (seeded)."""
    if data.labels is None:
        raise ValueError(f"benign user {spec.name}: its data source has no labels")
    rows = np.flatnonzero(np.isin(data.labels, spec.classes)) if spec.classes else np.arange(len(data))
    if len(rows) == 0:
        raise ValueError(f"benign user {spec.name}: no images of classes {list(spec.classes)} in its data")
    rng = np.random.default_rng(spec.seed)
    pick = rng.choice(rows, size=spec.queries, replace=spec.queries > len(rows))
    return data.images[pick], data.labels[pick]


def _classifier_utility(spec: BenignSpec, answers: np.ndarray, labels: np.ndarray, train: np.ndarray) -> float:
    """Accuracy over all ``labels`` int64 [n] of the argmax of ``answers`` float32 [a <= n, K] (unanswered
    queries are failures); ``train`` is unused (no probe)."""
    scores = np.array(answers, dtype=np.float64)
    if spec.classes:
        mask = np.full(scores.shape[1], -np.inf)
        mask[list(spec.classes)] = 0.0
        scores = scores + mask
    return float((scores.argmax(1) == labels[:len(scores)]).sum() / len(labels))


def _encoder_utility(spec: BenignSpec, answers: np.ndarray, labels: np.ndarray, train: np.ndarray) -> float:
    """Linear-probe accuracy: trained on the answered rows of ``answers`` float32 [a <= n, D] that
    ``train`` bool [n] marks, tested on the answered others; unanswered test rows are failures."""
    from evaluation.scoring import probe_accuracy

    answered = np.arange(len(labels)) < len(answers)
    fit, test = train & answered, ~train & answered
    if not test.any() or len(np.unique(labels[fit])) < 2:
        return 0.0
    acc = probe_accuracy(answers[fit[:len(answers)]], labels[fit], answers[test[:len(answers)]], labels[test],
                         seed=spec.seed)
    return float(acc * test.sum() / (~train).sum())


def run_benign(spec: BenignSpec, kind: str, victim: object, data: ImageDataset, *,
               progress: bool = True) -> BenignResult:
    """Run one honest user against ``victim`` (a :class:`~evaluation.client.VictimClient`) on ``data``:
    its images ``spec.passes`` times over, in the same order each pass."""
    images, labels = task_images(spec, data)
    n_train = int(round(len(labels) * spec.train_fraction))
    # The probe's training images are the first n_train of every pass: an image never trains and tests.
    train = np.tile(np.arange(len(labels)) < n_train, spec.passes)
    sent, labels = np.concatenate([images] * spec.passes), np.tile(labels, spec.passes)
    _, answers, refused = query_all(victim.query, sent, chunk=250, progress=progress,  # type: ignore[attr-defined]
                                    desc=f"honest {spec.name}")
    refused_after = len(answers) if refused else None
    if len(answers) == 0:
        return BenignResult(0.0, 0, refused_after)
    utility = (_classifier_utility if kind == "classifier" else _encoder_utility)(spec, answers, labels, train)
    return BenignResult(utility=utility, queries=len(answers), refused_after=refused_after)
