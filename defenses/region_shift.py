"""``region-shift``: a learnable encoder watermark, proven on fresh probes (``moat verify --config``).

The rule, fixed by the server secret: the embedding space is cut into 2^bits keyed cells (the sign
pattern of ``bits`` keyed hyperplanes, :class:`~defenses.keyed.HyperplaneCells`); a keyed share
``rate`` of the cells is marked, and each marked cell c has a keyed unit direction u_c. An answer
e float32 [D] whose clean embedding falls in a marked cell is sent as e + strength·‖e‖·u_c; every
other answer is sent as it is. The shift is the same for every query of the cell and every key,
so a copy trained on the answers (MSE, cosine, InfoNCE, StolenEncoder's augmented views,
Cont-Steal's NT-Xent: all pull copy(x) towards the answer) learns a piecewise-constant offset
field over large regions, which is consistent and simple and is learned early (Anti-Backdoor
Learning, Li et al., NeurIPS 2021: consistent marks are learned before clean structure); and
sybil keys, whose per-key B4B transforms are applied on top of the marked answer, all carry it.

Basis: EmbMarker (Peng et al., "Are You Copying My Model?", ACL 2023) adds one secret target
embedding to the answers of queries holding trigger words; WARDEN (Shetty et al., ACL 2024) uses
several targets so no single direction can be removed; RegionMarker/SemMark (2025) mark regions
of a secret low-dimensional projection. Here the trigger is a region of the model's own embedding
space (natural queries hit it, so no trigger has to be sent), and each marked region has its own
direction, which makes the test's null exact.

Proof (:meth:`RegionShift.prove`): the verifier embeds its own probes with the victim (clean E)
and the suspect (Z, any dimension: a copy lives in its own space, or in a key's B4B-transformed
space), fits an affine map Z -> E by least squares on the probes of *unmarked* cells, and for
each marked cell with probes takes the mean residual r_c = mean(Z·A − E) over its probes and
cos(r_c, u_c). Given the cells and the marked set, A and the r_c do not depend on the directions,
which are independent uniform unit vectors when the suspect is independent of the secret; so
Σ cos is sub-Gaussian with proxy M/D (:func:`~defenses.proof.sphere_p_value`), an exact,
conservative null without reference models.

Cost and what it hides: no evidence is written and the rule costs the same on every answer, so
a marked answer cannot be told by its latency; nothing per request reaches the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from contracts.batch import ModelKind
from contracts.params import ParamError, check_keys, number
from defenses.base import DefenseContext
from defenses.keyed import HyperplaneCells, keyed_generator, keyed_unit_vectors
from defenses.proof import Proof, ProofError, sphere_p_value
from defenses.watermark import WATERMARKS, Marked

__all__ = ["RegionShift"]

DEFAULT_BITS = 8
DEFAULT_RATE = 0.25
DEFAULT_STRENGTH = 1.0
MIN_FIT_PER_DIM = 2  # unmarked probes per fitted coefficient row, so the map is not over-fitted
RIDGE = 1e-3


@WATERMARKS.register("region-shift")
class RegionShift:
    """Keyed cells of the embedding space, a keyed share of them shifted along keyed directions.

    Params:
        bits: keyed hyperplanes, 2^bits cells, 1..12 (default 8).
        rate: share of cells marked, in (0, 1) (default 0.25).
        strength: the shift's length relative to ‖e‖, > 0 (default 1.0).
    """

    name = "region-shift"
    before_defenses = True  # marks the clean embedding; per-key transforms then apply on top
    max_evidence = 0  # proof rests on the rule, not on stored answers

    def __init__(self, params: Mapping[str, Any], *, kind: ModelKind, secret: bytes) -> None:
        check_keys(params, ("bits", "rate", "strength"))
        if kind != "encoder":
            raise ParamError("name", f"region-shift moves embeddings; it does not apply to a {kind}")
        self.bits = int(number(params, "bits", DEFAULT_BITS, low=1, high=12, integer=True))
        self.rate = float(number(params, "rate", DEFAULT_RATE, low=0.0, high=1.0, low_inclusive=False,
                                 high_inclusive=False))
        self.strength = float(number(params, "strength", DEFAULT_STRENGTH, low=0.0, low_inclusive=False))
        self._key = bytes(secret)
        self._tables: dict[int, tuple[HyperplaneCells, np.ndarray, np.ndarray]] = {}

    def _rule(self, dim: int) -> tuple[HyperplaneCells, np.ndarray, np.ndarray]:
        """For ``dim``-wide embeddings: the cells, marked bool [2^bits], directions float64 [2^bits, dim]."""
        rule = self._tables.get(dim)
        if rule is None:
            cells = HyperplaneCells(self._key, f"region-shift/cells/{dim}", dim, self.bits)
            marked = keyed_generator(self._key, f"region-shift/marked/{dim}").random(cells.count) < self.rate
            directions = keyed_unit_vectors(self._key, f"region-shift/directions/{dim}", cells.count, dim)
            rule = self._tables[dim] = (cells, marked, directions)
        return rule

    def marked(self, embeddings: np.ndarray) -> np.ndarray:
        """bool [B]: which clean embeddings float [B, D] fall in a marked cell."""
        cells, marked, _ = self._rule(np.asarray(embeddings).shape[1])
        return marked[cells.of(embeddings)]

    def mark(self, outputs: np.ndarray, context: DefenseContext) -> Marked:
        """Shift the rows in marked cells: clean float32 [B, D] -> float32 [B, D]."""
        e = np.asarray(outputs)
        if e.ndim != 2 or e.shape[1] < 2:
            raise ValueError(f"region-shift expects embeddings [B, D] with D >= 2, got shape {e.shape}")
        cells, marked, directions = self._rule(e.shape[1])
        cell = cells.of(e)
        rows = np.flatnonzero(marked[cell])
        out = e.astype(np.float32, copy=True)
        if len(rows):
            norms = np.linalg.norm(e[rows].astype(np.float64), axis=1, keepdims=True)
            out[rows] = (e[rows] + self.strength * norms * directions[cell[rows]]).astype(np.float32)
        return Marked(out)

    def prove(self, clean: np.ndarray, suspect: np.ndarray) -> Proof:
        """The ownership test on probes: the victim's clean embeddings float [N, D] and the
        suspect's answers float [N, D'] to the same probes (see the module docstring)."""
        e, z = _checked(clean, suspect)
        cells, marked, directions = self._rule(e.shape[1])
        cell = cells.of(e)
        in_marked = marked[cell]
        fit = ~in_marked
        design = np.hstack([z, np.ones((len(z), 1))])
        if fit.sum() < MIN_FIT_PER_DIM * design.shape[1]:
            raise ProofError(f"too few probes outside the marked cells to map the suspect's space: "
                             f"{int(fit.sum())}, need {MIN_FIT_PER_DIM * design.shape[1]}")
        gram = design[fit].T @ design[fit] + RIDGE * np.eye(design.shape[1])
        mapping = np.linalg.solve(gram, design[fit].T @ e[fit])
        residual = design @ mapping - e
        scored = np.unique(cell[in_marked])
        means = np.stack([residual[cell == c].mean(axis=0) for c in scored]) if len(scored) else np.zeros((0, e.shape[1]))
        norms = np.linalg.norm(means, axis=1)
        cos = np.divide(np.sum(means * directions[scored], axis=1), norms, out=np.zeros(len(scored)), where=norms > 0)
        z_score, p = sphere_p_value(cos, e.shape[1])
        fitted = 1 - float(np.sum(residual[fit] ** 2) / max(np.sum((e[fit] - e[fit].mean(0)) ** 2), 1e-12))
        return Proof(n=len(scored), probes=int(in_marked.sum()), statistic=z_score, p_value=p,
                     test="sub-Gaussian bound on the sum of cos(mean residual of a marked cell, its keyed "
                          "direction), after an affine map suspect -> victim fitted on unmarked cells: "
                          "exp(-D S^2 / (2 M))",
                     figures={"mean_cos": round(float(cos.mean()) if len(cos) else 0.0, 4), "dim": int(e.shape[1]),
                              "fit_r2": round(fitted, 4)})


def _checked(clean: np.ndarray, suspect: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 [N, D] and [N, D'] with N equal and D >= 2, finite; ``ProofError`` otherwise."""
    e, z = np.asarray(clean, dtype=np.float64), np.asarray(suspect, dtype=np.float64)
    if e.ndim != 2 or z.ndim != 2 or len(e) != len(z) or e.shape[1] < 2 or z.shape[1] < 1:
        raise ProofError(f"expected clean [N, D >= 2] and suspect [N, D'] answers to the same probes, "
                         f"got {list(e.shape)} and {list(z.shape)}")
    if not (np.all(np.isfinite(e)) and np.all(np.isfinite(z))):
        raise ProofError("the answers hold NaN or infinite values")
    return e, z
