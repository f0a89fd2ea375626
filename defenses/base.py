"""The defense contract: turn a clean answer into the one a client receives.

Defenses are pure numpy: no grpc, no protobuf. Any randomness is a deterministic function of
(server secret, client, query), so repeating a query and averaging recovers nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from contracts.batch import ModelKind, QueryBatch, Verdict
from contracts.registry import Registry
from defenses.codes import PooledQueries, coarse_grid, quantised_codes


@dataclass(frozen=True)
class DefenseContext:
    """What a defense may base its answer on.

    Attributes:
        client: the authenticated client id.
        batch: the queries and clean answers (``batch.outputs`` float32 [B, K]).
        verdicts: detector name -> verdict after this batch.
        suspicion: the policy's combined suspicion in [0, 1].
        flagged: whether the policy considers the client a likely thief.
        pooled: the batch's queries pooled (``PooledQueries.of(batch.inputs)``), shared by the
            defenses and the watermark of one answer: given when the caller pooled them beforehand
            (the gateway does while the model computes the answer), else set on first use.
    """

    client: str
    batch: QueryBatch
    verdicts: Mapping[str, Verdict] = field(default_factory=dict)
    suspicion: float = 0.0
    flagged: bool = False
    pooled: PooledQueries | None = field(default=None, repr=False, compare=False)

    def query_codes(self, levels: int, rows: np.ndarray | None = None) -> list[bytes]:
        """``defenses.codes.query_codes(batch.inputs[rows], levels)`` (all rows when
        ``rows`` is None), pooling the batch's inputs once per answer: misinformation and DAWN
        both code every query of a flagged client's answer."""
        pooled = self.pooled
        if pooled is None:
            if rows is not None:  # a few rows of the batch: pool just those, keep nothing
                return quantised_codes(coarse_grid(np.asarray(self.batch.inputs)[rows]), levels)
            pooled = PooledQueries(coarse_grid(self.batch.inputs))
            object.__setattr__(self, "pooled", pooled)  # frozen for its callers; this is the answer's cache
        return pooled.codes(levels) if rows is None else quantised_codes(pooled.grid[rows], levels)


@runtime_checkable
class Defense(Protocol):
    name: str

    def apply(self, outputs: Any, context: DefenseContext) -> Any:
        """Return the answer to send: same shape and dtype as ``outputs`` (float32 [B, K]);
        for classifiers every row stays a probability distribution."""
        ...


# A third-party defense is a factory ``(params, *, kind, secret) -> Defense`` declared as an entry
# point in the ``moat.defenses`` group.
DEFENSES: Registry[Defense] = Registry(
    "defense", group="moat.defenses",
    builtins={"b4b": "defenses.b4b", "misinformation": "defenses.misinformation",
              **dict.fromkeys(("reverse_sigmoid", "rounding", "top_k", "label_only"), "defenses.perturbations")})


def create_defense(name: str, params: Mapping[str, Any], *, kind: ModelKind, secret: bytes) -> Defense:
    """Build a registered defense; ``ParamError`` names a bad parameter, and a defense that does
    not apply to ``kind`` raises ``ParamError('name', ...)``; ``KeyError`` an unknown name."""
    return DEFENSES.get(name)(params, kind=kind, secret=secret)
