"""Output perturbations for classifiers: reverse sigmoid, rounding, top-k and label-only.

Each one keeps every row a probability distribution (float32, >= 0, sums to 1 within 1e-6) and the
argmax (up to ties). That last point is also their limit: they blunt a thief who trains on soft
labels, and do nothing against one who trains on hard labels (REFERENCE.md §2). All take
``when``: ``always`` (default) or ``flagged`` (only for clients the policy flags). They use no
randomness, so they need no secret and give identical answers to identical queries.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from contracts.batch import ModelKind
from contracts.params import ParamError, check_keys, choice, number
from defenses.base import DEFENSES, DefenseContext

__all__ = ["LabelOnly", "ReverseSigmoid", "Rounding", "TopK", "normalize_rows"]

WHEN = ("always", "flagged")


def normalize_rows(probs: np.ndarray) -> np.ndarray:
    """float [B, K] -> float64 [B, K]: negatives clipped to 0, rows scaled to sum to 1; a row with
    nothing left becomes uniform (never divide by zero)."""
    p = np.maximum(np.asarray(probs, dtype=np.float64), 0.0)  # np.clip's wrapper costs more than this
    total = p.sum(axis=1, keepdims=True)
    if np.all(total > 0.0):  # the usual case: skip building the uniform rows
        return p / total
    uniform = np.full_like(p, 1.0 / max(p.shape[1], 1))
    return np.where(total > 0.0, p / np.where(total > 0.0, total, 1.0), uniform)


class _Perturbation:
    """Shared plumbing: param checking, the classifier-only rule, ``when`` gating, shape checks."""

    name: ClassVar[str]
    _params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Mapping[str, Any], *, kind: ModelKind, secret: bytes = b"") -> None:
        check_keys(params, ("when", *self._params))
        if kind != "classifier":
            raise ParamError("name", f"{self.name} perturbs class probabilities; it does not apply to a {kind}")
        self.when: str = choice(params, "when", "always", WHEN)
        self._configure(params)

    def _configure(self, params: Mapping[str, Any]) -> None:
        """Read the subclass's own params (none by default)."""

    def apply(self, outputs: np.ndarray, context: DefenseContext) -> np.ndarray:
        """Perturbed probabilities: float32 [B, K] in, float32 [B, K] out (input left untouched)."""
        p = np.asarray(outputs)
        if p.ndim != 2:
            raise ValueError(f"{self.name} expects probabilities [B, K], got shape {p.shape}")
        if (self.when == "flagged" and not context.flagged) or p.size == 0:
            return p.astype(np.float32, copy=True)
        return self._perturb(normalize_rows(p)).astype(np.float32)

    def _perturb(self, p: np.ndarray) -> np.ndarray:
        """float64 [B, K] distributions -> float64 [B, K] distributions."""
        raise NotImplementedError


@DEFENSES.register("reverse_sigmoid")
class ReverseSigmoid(_Perturbation):
    """Reverse sigmoid (Lee et al., "Defending Against NN Model Stealing Attacks Using Deceptive
    Perturbations", IEEE S&P Workshops 2019), as in ART's ``ReverseSigmoid`` postprocessor:
    ``r = β·(σ(γ·logit(p)) − 0.5)``, ``p̃ = normalise(clip(p − r, 0, 1))``; params ``beta`` (1.0) and
    ``gamma`` (0.1), both > 0. The logit uses p clipped to [1e-9, 1 − 1e-9] (ART's epsilon), so
    exact 0 and 1 are safe.

    Deviation: ``p − r`` is not monotone in p (for p → 0 it tends to β·(0.5 − σ(γ·logit(1e-9)))
    ≈ 0.39 with the defaults), so on a flat row a near-zero class can overtake the top one. We swap
    the two entries back in that case, so the top-1 label is always kept, as the paper intends.
    """

    name = "reverse_sigmoid"
    _params = ("beta", "gamma")
    _EPS = 1e-9

    def _configure(self, params: Mapping[str, Any]) -> None:
        self.beta = float(number(params, "beta", 1.0, low=0.0, low_inclusive=False))
        self.gamma = float(number(params, "gamma", 0.1, low=0.0, low_inclusive=False))

    def _perturb(self, p: np.ndarray) -> np.ndarray:
        clipped = np.clip(p, self._EPS, 1.0 - self._EPS)
        logit = np.log(clipped) - np.log1p(-clipped)
        r = self.beta * (1.0 / (1.0 + np.exp(-self.gamma * logit)) - 0.5)
        q = normalize_rows(np.clip(p - r, 0.0, 1.0))
        top, new = p.argmax(axis=1), q.argmax(axis=1)
        rows = np.nonzero(top != new)[0]
        # Fancy indexing copies the right-hand side first, so this is a true swap.
        q[rows, top[rows]], q[rows, new[rows]] = q[rows, new[rows]], q[rows, top[rows]]
        return q


@DEFENSES.register("rounding")
class Rounding(_Perturbation):
    """Rounding of the probabilities to ``decimals`` places (default 3, 0..6), the baseline of
    Tramèr et al., "Stealing Machine Learning Models via Prediction APIs", USENIX Security 2016.

    Rounding each entry and renormalising would undo the rounding; instead we use largest-remainder
    rounding: every entry is floored to a multiple of 10^-decimals, and the units still missing to
    reach exactly 10^decimals are handed to the entries with the largest remainders. Every value is
    then a multiple of 10^-decimals and the row sums to exactly 1 in decimal, so the float32 sum is
    off by float rounding only (~1e-7). Each entry moves by less than 10^-decimals.
    """

    name = "rounding"
    _params = ("decimals",)

    def _configure(self, params: Mapping[str, Any]) -> None:
        self.decimals: int = number(params, "decimals", 3, low=0, high=6, integer=True)

    def _perturb(self, p: np.ndarray) -> np.ndarray:
        scale = 10 ** self.decimals
        units = p * scale
        base = np.floor(units)
        missing = np.clip(np.rint(scale - base.sum(axis=1)), 0, p.shape[1]).astype(np.int64)
        # Rank entries by remainder (largest first, ties to the lower index) and top up the first ones.
        order = np.argsort(-(units - base), axis=1, kind="stable")
        rank = np.argsort(order, axis=1)  # the inverse permutation: each entry's place in `order`
        return (base + (rank < missing[:, None])) / scale


@DEFENSES.register("top_k")
class TopK(_Perturbation):
    """Top-k probabilities (Orekondy et al., "Knockoff Nets", CVPR 2019; Tramèr et al. 2016): keep
    the ``k`` largest (default 1), zero the rest and renormalise. ``k`` must be an integer >= 1 at
    build time and is checked against the number of classes K when applied (``ParamError('k')``)."""

    name = "top_k"
    _params = ("k",)

    def _configure(self, params: Mapping[str, Any]) -> None:
        self.k: int = number(params, "k", 1, low=1, integer=True)

    def _perturb(self, p: np.ndarray) -> np.ndarray:
        if self.k > p.shape[1]:
            raise ParamError("k", f"must be <= the number of classes ({p.shape[1]}), got {self.k}")
        # A stable sort of -p keeps exactly k entries even with ties (the lower indices win).
        keep = np.argsort(-p, axis=1, kind="stable")[:, : self.k]
        mask = np.zeros(p.shape, dtype=bool)
        np.put_along_axis(mask, keep, True, axis=1)
        return normalize_rows(np.where(mask, p, 0.0))


@DEFENSES.register("label_only")
class LabelOnly(_Perturbation):
    """Label only (Tramèr et al. 2016; Orekondy et al. 2019): the one-hot vector of the argmax."""

    name = "label_only"

    def _perturb(self, p: np.ndarray) -> np.ndarray:
        out = np.zeros_like(p)
        np.put_along_axis(out, p.argmax(axis=1)[:, None], 1.0, axis=1)
        return out
