"""Ownership tests on fresh probes: the statistics behind ``moat verify --config``.

A learnable watermark (``defenses.region_shift``) is a rule the server
secret fixes: which regions of the model's input space are marked, and how. A copy trained on
the marked answers follows the rule on *any* input of those regions, so the verifier tests it on
probes of its own (images the thief never had to send), after recomputing the rule from the
secret. The p-values here are exact bounds under H0 "the suspect is independent of the secret":
the keyed choices the statistic is scored against are then independent of the suspect's answers,
uniformly random given everything else the statistic uses, so no reference models are needed
and no parameter can be picked after seeing a suspect.

The null distribution: for keyed unit vectors u_c uniform on the sphere S^{D−1}, cos(v_c, u_c)
for a fixed v_c is the first coordinate of a uniform point, sub-Gaussian with proxy 1/D (Marchal &
Arbel, "On the sub-Gaussianity of the Beta and Dirichlet distributions", 2017), so the sum S of M
independent such cosines has P[S ≥ s] ≤ exp(−D s² / (2M)) (:func:`sphere_p_value`): a conservative
bound on an exact distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Proof", "ProofError", "sphere_p_value", "verdict"]

DEFAULT_ALPHA = 0.01


class ProofError(ValueError):
    """The probes or the suspect's answers cannot carry a test; the message says why."""


@dataclass(frozen=True)
class Proof:
    """One ownership test: ``n`` independent units scored (cells), ``probes`` used, the standardised
    ``statistic`` (a z-score: the statistic over the square root of its variance proxy),
    ``p_value`` and the ``test`` in words, plus named ``figures`` for reading."""

    n: int
    probes: int
    statistic: float
    p_value: float
    test: str
    figures: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
        """JSON-ready: the fields, ``alpha`` and ``verdict`` (``stolen`` when p < alpha)."""
        return {"n": self.n, "probes": self.probes, "statistic": round(self.statistic, 4),
                "p_value": self.p_value, "test": self.test, **self.figures, "alpha": alpha,
                "verdict": verdict(self.p_value, alpha)}


def verdict(p_value: float, alpha: float = DEFAULT_ALPHA) -> str:
    """``stolen`` when ``p_value`` < ``alpha``, else ``not-proven``."""
    if not 0 < alpha < 1:
        raise ProofError(f"alpha must be in (0, 1), got {alpha}")
    return "stolen" if p_value < alpha else "not-proven"


def sphere_p_value(cosines: np.ndarray, dim: int) -> tuple[float, float]:
    """(z, p) for M cosines float [M] between fixed vectors and keyed uniform unit vectors of
    R^``dim``: S = Σ cos, z = S·sqrt(dim / M), p = exp(−z²/2) for S > 0, else 1."""
    cos = np.asarray(cosines, dtype=np.float64)
    if len(cos) == 0:
        return 0.0, 1.0
    z = float(cos.sum()) * math.sqrt(dim / len(cos))
    return z, (math.exp(-z * z / 2) if z > 0 else 1.0)
