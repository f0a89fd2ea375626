"""The detector contract: observe one client's batch, update its state, return a verdict.

Detectors are pure numpy (+ FAISS): no grpc, no protobuf. Their state lives in a
:class:`contracts.state.StateStore`, never in the object, so gateway replicas share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from contracts.batch import ModelKind, QueryBatch, Verdict
from contracts.registry import Registry
from contracts.state import StateStore


@runtime_checkable
class Detector(Protocol):
    name: str

    def observe(self, client: str, batch: QueryBatch) -> Verdict:
        """Update ``client``'s state with ``batch`` and return the verdict after it."""
        ...

    def peek(self, client: str, model: str) -> Verdict:
        """The client's current verdict, without changing any state."""
        ...


# A third-party detector is a factory ``(params, *, store, kind, seed) -> Detector`` declared as an
# entry point in the ``moat.detectors`` group.
DETECTORS: Registry[Detector] = Registry(
    "detector", group="moat.detectors",
    builtins={"coverage": "detectors.coverage", "prada": "detectors.prada"})


def create_detector(
    name: str, params: Mapping[str, Any], *, store: StateStore, kind: ModelKind, seed: int,
) -> Detector:
    """Build a registered detector. ``seed`` derives from the server secret so every replica hashes
    alike; ``ParamError`` names a bad parameter, ``KeyError`` an unknown name."""
    return DETECTORS.get(name)(params, store=store, kind=kind, seed=seed)
