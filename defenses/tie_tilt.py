"""``tie-tilt``: a learnable classifier watermark for hard-label thieves, proven on fresh probes.

The rule, fixed by the server secret: a query's *cell* is its victim's top-two classes (a, b) and
the sign pattern of ``bits`` keyed hyperplanes through its centred 7×7 pooled image
(:class:`~defenses.keyed.HyperplaneCells`); each cell has a keyed fair sign σ. On a near-tie
(p_a − p_b < ``margin``) the answer is the larger-indexed class of the pair when σ = +1 and the
smaller when σ = −1 (the two probabilities swapped, so soft and hard answers agree); every other
answer is sent as it is. So within a cell the decision between a and b is consistently pushed one
way: a copy trained on hard labels learns a boundary shifted per cell, which is consistent and
simple (learned early: Anti-Backdoor Learning, Li et al., NeurIPS 2021), and the same for every key
(sybils inherit it; pooling keys does not dilute it). Near-ties are where the victim itself is
nearly a coin toss, so honest users lose little (measured on the demo classifier: 2.6% of answers
changed, accuracy −0.23 points at margin 0.15).

Basis: the hard-label analogue of CosWM (Charette et al., AAAI 2022) and GINSEW (Zhao et al.,
ICML 2023), which add a keyed smooth signal to output probabilities that distilled copies learn;
here the signal is a keyed choice between the top two classes, taken only on near-ties.

Proof (:meth:`TieTilt.prove`): on the verifier's own probes that the victim answers with a
near-tie (p_a − p_b < ``probe_margin``), the suspect's log-odds between the pair, log s_hi −
log s_lo, is regressed on the victim's (fitted on all those probes: no key involved) and the
residuals averaged per cell: r_c over n_c probes. A copy leans the way its cell's sign says.
Given the cells, the r_c do not depend on the signs, which are independent fair coins when the
suspect is independent of the secret, so T = Σ σ_c √n_c r_c has the exact, conservative bound
of :func:`~defenses.proof.sign_p_value` (Hoeffding); no reference models are needed. The test reads
the suspect's scores, not only its argmax: a hard-label copy still leans in its probabilities on
probes it does not flip.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import numpy as np

from defenses.base import DefenseContext
from defenses.codes import coarse_grid
from defenses.keyed import HyperplaneCells
from defenses.proof import Proof, ProofError, sign_p_value
from defenses.watermark import WATERMARKS, Marked
from detectors.base import ModelKind
from gateway.params import ParamError, check_keys, number

__all__ = ["TieTilt", "log_scores"]

DEFAULT_MARGIN = 0.15
DEFAULT_PROBE_MARGIN = 0.3
DEFAULT_BITS = 4
SIGN_CACHE = 1 << 16
LOG_FLOOR = 1e-12


def log_scores(scores: np.ndarray) -> np.ndarray:
    """float64 [N, K] log-probabilities of a suspect's answers: probabilities (non-negative rows
    summing to 1) are logged (floored at 1e-12), anything else is read as logits (log-softmax)."""
    s = np.asarray(scores, dtype=np.float64)
    if np.all(s >= 0) and np.allclose(s.sum(axis=1), 1.0, atol=1e-3):
        return np.log(np.maximum(s, LOG_FLOOR))
    shifted = s - s.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@WATERMARKS.register("tie-tilt")
class TieTilt:
    """Keyed per-cell choice between the top two classes on near-ties.

    Params:
        margin: answers with p_a − p_b below it are tilted, in (0, 1) (default 0.15).
        bits: keyed hyperplanes over the pooled image, 0..8 (default 4): 2^bits cells per pair.
        probe_margin: the verifier scores probes with p_a − p_b below it, in (0, 1] (default 0.3).
    """

    name = "tie-tilt"
    before_defenses = True  # the mark belongs to the model's answer; per-key defenses act on top
    max_evidence = 0  # proof rests on the rule, not on stored answers
    query_levels = ()  # reads the pooled grid (no codes): pooled ahead by the gateway like theirs

    def __init__(self, params: Mapping[str, Any], *, kind: ModelKind, secret: bytes) -> None:
        check_keys(params, ("margin", "bits", "probe_margin"))
        if kind != "classifier":
            raise ParamError("name", f"tie-tilt chooses between classes; it does not apply to a {kind}")
        self.margin = float(number(params, "margin", DEFAULT_MARGIN, low=0.0, high=1.0, low_inclusive=False,
                                   high_inclusive=False))
        self.bits = int(number(params, "bits", DEFAULT_BITS, low=0, high=8, integer=True))
        self.probe_margin = float(number(params, "probe_margin", DEFAULT_PROBE_MARGIN, low=0.0, high=1.0,
                                         low_inclusive=False))
        if not isinstance(secret, (bytes, bytearray)) or not secret:
            raise ValueError("the watermark secret must be non-empty bytes")
        self._key = bytes(secret)
        self._planes: dict[int, HyperplaneCells] = {}
        self._sign = functools.lru_cache(maxsize=SIGN_CACHE)(self._keyed_sign)

    def _keyed_sign(self, cell: int) -> float:
        digest = hmac.new(self._key, b"tie-tilt/sign\x00" + cell.to_bytes(8, "big"), hashlib.sha256).digest()
        return 1.0 if digest[0] & 1 else -1.0

    def signs(self, cells: np.ndarray) -> np.ndarray:
        """The keyed sign float64 [N] (±1) of each cell id int64 [N]."""
        return np.array([self._sign(int(c)) for c in cells], dtype=np.float64)

    def cells(self, grid: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cell int64 [B], smaller class int64 [B], larger class int64 [B]) of queries given their
        pooled grids float [B, g, g'] (``defenses.codes.coarse_grid``) and clean probabilities [B, K]."""
        p = np.asarray(probs)
        top = np.argsort(-p, axis=1, kind="stable")[:, :2]
        lo, hi = top.min(axis=1), top.max(axis=1)
        pair = lo * p.shape[1] + hi
        if self.bits == 0:
            return pair.astype(np.int64), lo, hi
        flat = np.asarray(grid, dtype=np.float64).reshape(len(p), -1)
        planes = self._planes.get(flat.shape[1])
        if planes is None:
            planes = self._planes[flat.shape[1]] = HyperplaneCells(
                self._key, f"tie-tilt/pixels/{flat.shape[1]}", flat.shape[1], self.bits)
        side = planes.of(flat - flat.mean(axis=1, keepdims=True))
        return (pair.astype(np.int64) << self.bits) + side, lo, hi

    def mark(self, outputs: np.ndarray, context: DefenseContext) -> Marked:
        """Tilt the near-tie rows: clean probabilities float32 [B, K] -> float32 [B, K]."""
        p = np.asarray(outputs)
        if p.ndim != 2 or p.shape[1] < 2:
            raise ValueError(f"tie-tilt expects probabilities [B, K] with K >= 2, got shape {p.shape}")
        ordered = np.sort(p, axis=1)
        rows = np.flatnonzero(ordered[:, -1] - ordered[:, -2] < self.margin)
        out = p.astype(np.float32, copy=True)
        if not len(rows):
            return Marked(out)
        grid = context.pooled.grid[rows] if context.pooled is not None else coarse_grid(context.batch.inputs[rows])
        cell, lo, hi = self.cells(grid, p[rows])
        chosen = np.where(self.signs(cell) > 0, hi, lo)
        top = p[rows].argmax(axis=1)
        high, low = out[rows, top], out[rows, chosen]
        out[rows, top], out[rows, chosen] = low, high
        return Marked(out)

    def prove(self, queries: np.ndarray, clean: np.ndarray, suspect: np.ndarray) -> Proof:
        """The ownership test on probes ``queries`` [N, ...] given the victim's clean probabilities
        float [N, K] and the suspect's answers float [N, K] (probabilities or logits)."""
        p, s = np.asarray(clean, dtype=np.float64), np.asarray(suspect, dtype=np.float64)
        if p.ndim != 2 or p.shape != s.shape or p.shape[1] < 2 or len(queries) != len(p):
            raise ProofError(f"expected clean and suspect answers [N, K >= 2] to the same {len(queries)} probes, "
                             f"got {list(p.shape)} and {list(s.shape)}")
        if not np.all(np.isfinite(s)):
            raise ProofError("the suspect's answers hold NaN or infinite values")
        ordered = np.sort(p, axis=1)
        near = np.flatnonzero(ordered[:, -1] - ordered[:, -2] < self.probe_margin)
        if len(near) < 3:
            raise ProofError(f"only {len(near)} probes are near-ties of the victim; the test needs more probes")
        cell, lo, hi = self.cells(coarse_grid(np.asarray(queries)[near]), p[near])
        residual = _residual_log_odds(log_scores(s[near]), np.log(np.maximum(p[near], LOG_FLOOR)), lo, hi)
        ids, index, counts = np.unique(cell, return_inverse=True, return_counts=True)
        means = np.bincount(index.reshape(-1), weights=residual, minlength=len(ids)) / counts
        z, p_value = sign_p_value(self.signs(ids), np.sqrt(counts) * means)
        chosen = np.where(self.signs(cell) > 0, hi, lo)
        return Proof(n=len(ids), probes=len(near), statistic=z, p_value=p_value,
                     test="Hoeffding bound on sum over cells of sign_c * sqrt(n_c) * mean residual log-odds "
                          "(suspect vs victim, larger vs smaller class of the top two): exp(-z^2 / 2)",
                     figures={"follows": round(float(np.mean(s[near].argmax(axis=1) == chosen)), 4)})


def _residual_log_odds(suspect: np.ndarray, victim: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """float64 [N]: the suspect's log-odds of hi over lo minus its least-squares line on the
    victim's log-odds (what the suspect shares with the victim everywhere is taken out)."""
    rows = np.arange(len(lo))
    s, v = suspect[rows, hi] - suspect[rows, lo], victim[rows, hi] - victim[rows, lo]
    design = np.stack([v, np.ones_like(v)], axis=1)
    coef, *_ = np.linalg.lstsq(design, s, rcond=None)
    return s - design @ coef
