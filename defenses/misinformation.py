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

import functools
import hashlib
import hmac
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from defenses.base import DEFENSES, DefenseContext
from defenses.perturbations import normalize_rows
from detectors.base import ModelKind
from gateway.params import ParamError, check_keys, choice, number

__all__ = ["AdaptiveMisinformation", "query_codes"]

#: Side of the pooled grid and number of grey levels of the coarse query code. Measured on 300
#: Fashion-MNIST test images x 50 near-duplicates each (every pixel +-1/255, clipped), the share of
#: near-duplicates keeping the code, and distinct codes among 5000 test images: 7x7 with 4 levels
#: 93.0% / 4931, 3 levels 95.0% / 4582, 2 levels 98.7% / 2876 (at +-2/255: 85.6%, 90.1%, 96.4%).
#: Two levels keep near-duplicates together and still separate most distinct images.
GRID = 7
LEVELS = 2
#: τ measured on the demo classifier (full Fashion-MNIST test set, 90.63% clean accuracy, as an
#: unflagged honest user): the largest of {0.3, 0.4, 0.5, 0.6} whose accuracy drop stays under 0.5
#: points. Answers whose label changed / accuracy drop: 0.3: 0.36% / 0.12 points, 0.4: 1.84% / 0.64,
#: 0.5: 5.46% / 2.30, 0.6: 10.99% / 5.40 (0.35: 1.02% / 0.28). Natural-image crops (a thief's
#: out-of-distribution pool) misinformed at τ = 0.3: 6.5%. Flagged clients get h = 1 regardless.
DEFAULT_TAU = 0.3


def query_codes(inputs: np.ndarray, levels: int = LEVELS) -> list[bytes]:
    """Coarse codes of queries: float [B, C, H, W] (also [B, H, W] or [B, F]) in [0, 1] -> B byte
    strings. The first channel is average-pooled to a ≤7×7 grid and quantised to ``levels`` grey
    levels (default 2: block mean below or above 0.5), so a change of a grey level or two per pixel
    rarely changes the code."""
    x = np.asarray(inputs, dtype=np.float64)
    if x.ndim == 2:
        x = x[:, None, :]
    elif x.ndim >= 4:
        x = x.reshape(x.shape[0], -1, *x.shape[-2:])[:, 0]
    if x.ndim != 3:
        raise ValueError(f"queries must be [B, C, H, W], [B, H, W] or [B, F]; got shape {np.shape(inputs)}")
    pooled = _pool(_pool(x, axis=1), axis=2)
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be in 2..256, got {levels}")
    # floor(v * levels) of v in [0, 1] is its truncation; np.minimum/np.maximum rather than np.clip,
    # whose Python wrapper cost more than the arithmetic (this runs on every classifier answer).
    unit = np.minimum(np.maximum(pooled, 0.0), 1.0)
    quantised = np.minimum((unit * levels).astype(np.uint8), np.uint8(levels - 1))
    shape = struct.pack(">II", *quantised.shape[1:])
    return [shape + row.tobytes() for row in quantised]


def _pool(x: np.ndarray, axis: int) -> np.ndarray:
    """Average over min(GRID, n) near-equal bins along ``axis``."""
    starts, counts = _bins(x.shape[axis], x.ndim, axis)
    return np.add.reduceat(x, starts, axis=axis) / counts


@functools.lru_cache(maxsize=64)
def _bins(n: int, ndim: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin starts (int64 [bins]) and sizes (shaped to broadcast along ``axis``) for ``_pool``:
    computed once per shape, since every answer of a model pools the same image size (they were
    half of the pooling's cost per request)."""
    edges = np.linspace(0, n, min(GRID, n) + 1).round().astype(np.int64)
    counts = np.diff(edges).reshape([-1 if a == axis else 1 for a in range(ndim)])
    starts = edges[:-1]
    starts.flags.writeable = counts.flags.writeable = False  # shared by every caller
    return starts, counts


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

    def wrong_labels(self, client: str, inputs: np.ndarray, top: np.ndarray, classes: int) -> np.ndarray:
        """Keyed wrong class int64 [B] for queries ``inputs`` [B, ...] whose clean argmax is ``top`` [B]:
        ``(top + 1 + HMAC(secret, client, code) mod (K − 1)) mod K``, never equal to ``top``."""
        offsets = np.empty(len(top), dtype=np.int64)
        for i, code in enumerate(query_codes(inputs)):
            message = struct.pack(">I", len(client.encode())) + client.encode() + code
            digest = hmac.new(self._secret, b"misinformation/label\x00" + message, hashlib.sha256).digest()
            offsets[i] = 1 + int.from_bytes(digest[:8], "big") % (classes - 1)
        return (np.asarray(top, dtype=np.int64) + offsets) % classes

    def apply(self, outputs: np.ndarray, context: DefenseContext) -> np.ndarray:
        """Misinformed probabilities: float32 [B, K] in, float32 [B, K] out (input left untouched)."""
        p = np.asarray(outputs)
        if p.ndim != 2:
            raise ValueError(f"misinformation expects probabilities [B, K], got shape {p.shape}")
        h = self.gate(p, context.flagged)
        # Below 1e-9 the mix is invisible in float32: leave those rows bit-identical and skip their HMACs.
        rows = np.nonzero(h > 1e-9)[0]
        out = p.astype(np.float32, copy=True)
        if p.shape[1] < 2 or not len(rows):  # no wrong class to give, or nothing to change
            return out
        inputs = np.asarray(context.batch.inputs)
        if len(inputs) != len(p):
            raise ValueError(f"batch has {len(inputs)} queries but {len(p)} answers")
        y = normalize_rows(p[rows])
        wrong = self.wrong_labels(context.client, inputs[rows], y.argmax(axis=1), p.shape[1])
        mis = np.zeros_like(y)
        mis[np.arange(len(wrong)), wrong] = 1.0
        out[rows] = (1.0 - h[rows, None]) * y + h[rows, None] * mis
        return out
