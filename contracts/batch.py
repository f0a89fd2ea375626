"""What the algorithms and the gateway say to each other about one request: the model kind, the
query batch and a detector's verdict. Plain dataclasses over numpy arrays."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

ModelKind = Literal["classifier", "encoder"]


@dataclass(frozen=True)
class QueryBatch:
    """One request's queries and clean answers.

    Attributes:
        model: the model's name (state is kept per model and client).
        kind: ``classifier`` or ``encoder``.
        inputs: float32 [B, ...], the model's image input as the client sent it.
        outputs: float32 [B, K], the clean answer: class probabilities or the embedding.
        embeddings: float32 [B, E] query embeddings (a classifier's penultimate features), or None.
    """

    model: str
    kind: ModelKind
    inputs: np.ndarray
    outputs: np.ndarray
    embeddings: np.ndarray | None = None


@dataclass(frozen=True)
class Verdict:
    """What a detector concluded about a client after a batch.

    Attributes:
        detector: the detector's registered name.
        score: suspicion in [0, 1]; 1 means at or past the detector's alert threshold.
        figures: named measurements (``coverage`` in percent, ``shapiro_w``, ``queries``, ...).
        alert: whether the alert threshold is crossed.
    """

    detector: str
    score: float
    figures: Mapping[str, float] = field(default_factory=dict)
    alert: bool = False
