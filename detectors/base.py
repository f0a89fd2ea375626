"""The detector contract: observe one client's batch, update its state, return a verdict.

Detectors are pure numpy (+ FAISS): no grpc, no protobuf. Their state lives in a
:class:`gateway.state.StateStore`, never in the object, so gateway replicas share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from gateway.registry import Registry
from gateway.state.base import StateStore

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


@runtime_checkable
class Detector(Protocol):
    name: str

    def observe(self, client: str, batch: QueryBatch) -> Verdict:
        """Update ``client``'s state with ``batch`` and return the verdict after it."""
        ...

    def peek(self, client: str, model: str) -> Verdict:
        """The client's current verdict, without changing any state."""
        ...


DETECTORS: Registry[Detector] = Registry("detector")


def create_detector(
    name: str, params: Mapping[str, Any], *, store: StateStore, kind: ModelKind, seed: int,
) -> Detector:
    """Build a registered detector. ``seed`` derives from the server secret so every replica hashes
    alike; ``ParamError`` names a bad parameter."""
    _import_builtin()
    return DETECTORS.get(name)(params, store=store, kind=kind, seed=seed)


def _import_builtin() -> None:
    from detectors import coverage, prada  # noqa: F401  (register themselves)
