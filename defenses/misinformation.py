"""Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020) for classifiers, gated by suspicion.

``ŷ = (1 − h)·y + h·y_mis`` with ``h = sigmoid(ν·(τ − max y))``: confident, in-distribution-looking
answers go out (almost) untouched, low-confidence ones, typical of a thief's out-of-distribution
queries, get a deliberately wrong label. Unlike output perturbations that keep the argmax, this does
hurt a hard-label thief, so for a client the policy flags every answer is misinformed (h = 1).

The wrong label is keyed, not random per call: HMAC(secret, client, a coarse code of the query)
picks it, so a repeated query or a near-duplicate of it (tiny pixel changes survive 7×7 average
pooling and 2-level quantisation) gets the same wrong label, and voting over copies recovers nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from contracts.batch import ModelKind
from contracts.params import ParamError, check_keys, choice, number
from defenses.base import DEFENSES, DefenseContext
from defenses.codes import LEVELS, query_codes
from defenses.perturbations import normalize_rows

__all__ = ["AdaptiveMisinformation", "query_codes"]

#: The largest τ of {0.3, 0.4, 0.5, 0.6} whose accuracy drop for an unflagged honest user of the
#: demo classifier stays under 0.5 points (docs/performance-log.md, "Constants and their
#: measurements"). Flagged clients get h = 1 regardless.
DEFAULT_TAU = 0.3
#: An unflagged answer whose top probability is at least τ + UNTOUCHED_Z / ν gets h < e^-30, far
#: below the 1e-9 under which ``apply`` changes nothing: such answers skip the gate's arithmetic.
UNTOUCHED_Z = 30.0


@DEFENSES.register("misinformation")
class AdaptiveMisinformation:
    """Adaptive Misinformation (Kariyappa & Qureshi, "Defending Against Model Stealing Attacks with
    Adaptive Misinformation", CVPR 2020), for classifiers.

    Params:
        nu: sharpness ν of the gate (default 1000, > 0).
        tau: confidence threshold τ in (0, 1] (default 0.3, measured: see ``DEFAULT_TAU``).
        unflagged: ``ood`` (default): an unflagged client's low-confidence answers are misinformed;
            ``off``: unflagged clients are left untouched. Flagged clients always get h = 1.

    Deviations from the paper: its y_mis is the output of a second network trained to put little
    mass on the true class; here y_mis is a one-hot on a wrong class keyed by HMAC(secret, client,
    coarse query code), always different from the clean argmax. Its OOD detector is the maximum
    softmax probability, as here, but the paper applies it to every user; here flagged clients get
    misinformation on every answer, which is what hurts a hard-label thief.
    """

    name = "misinformation"
    # Codes the queries (only of the answers it changes, at LEVELS): the gateway pools them ahead
    # (ModelProtection.pool_queries); no level is coded for every answer.
    query_levels: tuple[int, ...] = ()

    def __init__(self, params: Mapping[str, Any], *, kind: ModelKind, secret: bytes) -> None:
        check_keys(params, ("nu", "tau", "unflagged"))
        if kind != "classifier":
            raise ParamError("name", f"misinformation changes class labels; it does not apply to a {kind}")
        self.nu = float(number(params, "nu", 1000, low=0.0, low_inclusive=False))
        self.tau = float(number(params, "tau", DEFAULT_TAU, low=0.0, high=1.0, low_inclusive=False))
        self.unflagged: str = choice(params, "unflagged", "ood", ("ood", "off"))
        if not isinstance(secret, (bytes, bytearray)) or not secret:
            raise ValueError("the defense secret must be non-empty bytes")
        self._secret = bytes(secret)
        self._untouched_from = self.tau + UNTOUCHED_Z / self.nu

    def gate(self, probs: np.ndarray, flagged: bool) -> np.ndarray:
        """Misinformation weight h float64 [B] for probabilities [B, K]: 1 when flagged, else
        sigmoid(ν·(τ − max p)) (or 0 when ``unflagged`` is ``off``)."""
        p = np.asarray(probs, dtype=np.float64)
        if flagged:
            return np.ones(len(p))
        if self.unflagged == "off":
            return np.zeros(len(p))
        z = self.nu * (self.tau - p.max(axis=1))
        # exp of a non-positive number only: no overflow for large ν.
        e = np.exp(-np.abs(z))
        return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

    def _untouched(self, probs: np.ndarray, flagged: bool) -> bool:
        """Whether ``apply`` leaves every row of ``probs`` [B, K] as it is, decided without the gate:
        an unflagged client's confident answers (most honest ones). Two numpy calls instead of the
        gate's dozen: in the gateway this runs on the answer's path, where each call runs with
        caches cold after the client and the model server had the CPU."""
        if flagged:
            return False
        if self.unflagged == "off" or not len(probs):
            return True
        return float(probs.max(axis=1).min()) >= self._untouched_from

    def wrong_labels(self, client: str, inputs: np.ndarray, top: np.ndarray, classes: int) -> np.ndarray:
        """Keyed wrong class int64 [B] for queries ``inputs`` [B, ...] whose clean argmax is ``top`` [B]:
        ``(top + 1 + HMAC(secret, client, code) mod (K − 1)) mod K``, never equal to ``top``."""
        return self._keyed_wrong_labels(client, query_codes(inputs), top, classes)

    def _keyed_wrong_labels(self, client: str, codes: list[bytes], top: np.ndarray, classes: int) -> np.ndarray:
        offsets = np.empty(len(top), dtype=np.int64)
        for i, code in enumerate(codes):
            message = struct.pack(">I", len(client.encode())) + client.encode() + code
            digest = hmac.new(self._secret, b"misinformation/label\x00" + message, hashlib.sha256).digest()
            offsets[i] = 1 + int.from_bytes(digest[:8], "big") % (classes - 1)
        return (np.asarray(top, dtype=np.int64) + offsets) % classes

    def apply(self, outputs: np.ndarray, context: DefenseContext) -> np.ndarray:
        """Misinformed probabilities: float32 [B, K] in, float32 [B, K] out (input left untouched)."""
        p = np.asarray(outputs)
        if p.ndim != 2:
            raise ValueError(f"misinformation expects probabilities [B, K], got shape {p.shape}")
        if self._untouched(p, context.flagged):
            return p if p.dtype == np.float32 else p.astype(np.float32)
        h = self.gate(p, context.flagged)
        # Below 1e-9 the mix is invisible in float32: leave those rows bit-identical and skip their HMACs.
        rows = np.nonzero(h > 1e-9)[0]
        out = p.astype(np.float32, copy=True)
        if p.shape[1] < 2 or not len(rows):  # no wrong class to give, or nothing to change
            return out
        if len(context.batch.inputs) != len(p):
            raise ValueError(f"batch has {len(context.batch.inputs)} queries but {len(p)} answers")
        y = normalize_rows(p[rows])
        codes = context.query_codes(LEVELS, rows if len(rows) < len(p) else None)
        wrong = self._keyed_wrong_labels(context.client, codes, y.argmax(axis=1), p.shape[1])
        mis = np.zeros_like(y)
        mis[np.arange(len(wrong)), wrong] = 1.0
        if context.flagged:  # h = 1 on every row: the answer is the one-hot itself (0·y + 1·mis)
            out[rows] = mis
        else:
            out[rows] = (1.0 - h[rows, None]) * y + h[rows, None] * mis
        return out
