"""Watermarks: answer a keyed fraction of queries in a way only the owner can predict, and keep the
queries and answers as evidence for a later ownership test (``moat verify``).

A watermark runs after the defenses in the protect stage. ``mark`` returns the answer to send and
one evidence record per watermarked query; the gateway writes the records to the state store
before the answer leaves. Like defenses, watermarks are pure numpy and keyed from the server secret
(a per-model key derived with purpose ``"watermark"``), so replicas watermark identically.

Evidence records are JSON objects. Every kind holds ``time`` (Unix seconds), ``query`` (the query
compactly: :func:`encode_query`) and the ``answer`` that was sent (a list of floats); each
watermark adds what its test needs (DAWN: ``label``, ``clean_label``, ``p_clean``; direction:
``clean``, ``direction``, ``clean_cos``). A query of the demo models (1×28×28, 8-bit grey levels)
takes 784 bytes, ~1.05 kB as base64; a DAWN record ~1.3 kB, a direction record of the 128-d demo
encoder ~5.6 kB (three vectors of 128 numbers).

Two watermarks, one per model kind, share the keyed selection (after DAWN): a query is marked when
HMAC(key, coarse code of the query) read as a fraction is below the rate r, so the decision and the
marked answer depend on the query alone (every client, near-duplicates included, gets the same):

- ``dawn`` (classifiers) answers a selected query with a keyed wrong label;
- ``direction`` (encoders) turns a selected query's embedding towards a keyed random unit vector u
  of the embedding space. A copy trained on the answers (MSE, cosine or InfoNCE: all pull its output
  towards the answer) learns to move those queries' outputs towards their u, and nothing else
  does: for a model independent of the key, the cosine between u and how its output departs from
  the clean answer is the first coordinate of a uniform point on the sphere (mean 0, variance
  1/D), so a positive sum over the evidence is the test (``gateway.verify``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from contracts.batch import ModelKind
from contracts.params import ParamError, check_keys, number
from contracts.registry import Registry
from defenses.base import DefenseContext
from defenses.codes import query_codes

__all__ = ["DAWN", "Direction", "Marked", "Watermark", "WATERMARKS", "create_watermark", "decode_query", "encode_query",
           "unit_rows"]

#: Grey levels of the selection code (7×7 pooled grid, see ``query_codes``), hashed with the
#: victim's clean argmax. Measured on 20,000 Fashion-MNIST training images (the demo classifier's
#: argmax appended): 2 levels: 9,752 distinct codes, the most common one holds 2.9% of the images,
#: 97.1% of near-duplicates (every pixel ±1/255) keep their code; 3 levels: 17,152, 0.56%, 95.7%;
#: 4 levels: 19,318, 0.18%, 93.2%. With 2 levels a single selected code could watermark 3% of an
#: honest user's answers; 3 levels keep that risk at r's scale and still follow near-duplicates.
DEFAULT_LEVELS = 3
DEFAULT_RATE = 0.005
DEFAULT_STRENGTH = 1.0
DEFAULT_MAX_EVIDENCE = 10_000


@dataclass(frozen=True)
class Marked:
    """A watermarked answer: ``outputs`` (same shape and dtype as the input answer) and one
    evidence record per watermarked query (``rows`` are their indices in the batch)."""

    outputs: np.ndarray
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    records: tuple[dict[str, Any], ...] = ()


@runtime_checkable
class Watermark(Protocol):
    name: str
    max_evidence: int

    def mark(self, outputs: np.ndarray, context: DefenseContext) -> Marked:
        """Watermark a keyed fraction of the answers ``outputs`` float32 [B, K]."""
        ...


# ``dawn`` and ``direction`` register below; a third-party watermark is a factory
# ``(params, *, kind, secret) -> Watermark`` declared as an entry point in ``moat.watermarks``.
WATERMARKS: Registry[Watermark] = Registry(
    "watermark", group="moat.watermarks", builtins={"region-shift": "defenses.region_shift"})


def create_watermark(name: str, params: Mapping[str, Any], *, kind: ModelKind, secret: bytes) -> Watermark:
    """Build a registered watermark; ``ParamError`` names a bad parameter, and a watermark that
    does not apply to ``kind`` raises ``ParamError('name', ...)``; ``KeyError`` an unknown name."""
    return WATERMARKS.get(name)(params, kind=kind, secret=secret)


def encode_query(query: np.ndarray) -> dict[str, Any]:
    """One query float32 [...] as ``{"dtype", "shape", "data"}`` (base64). Queries whose values are
    all multiples of 1/255 in [0, 1] (8-bit images) are stored as uint8 (``"u8"``, 4x smaller,
    lossless); anything else as float32 (``"f4"``)."""
    x = np.asarray(query, dtype=np.float32)
    scaled = x * np.float32(255.0)
    as_u8 = np.rint(scaled)
    if x.size and np.all((as_u8 >= 0) & (as_u8 <= 255)) and np.array_equal(
            (as_u8 / np.float32(255.0)).astype(np.float32), x):
        dtype, data = "u8", as_u8.astype(np.uint8).tobytes()
    else:
        dtype, data = "f4", x.astype("<f4").tobytes()
    return {"dtype": dtype, "shape": list(x.shape), "data": base64.b64encode(data).decode("ascii")}


def decode_query(stored: Mapping[str, Any]) -> np.ndarray:
    """The query float32 [shape] from :func:`encode_query`'s dict; ``ValueError`` if malformed."""
    try:
        shape = [int(s) for s in stored["shape"]]
        raw = base64.b64decode(stored["data"], validate=True)
        dtype = stored["dtype"]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"malformed query in evidence record: {error}") from None
    if dtype == "u8":
        values = np.frombuffer(raw, np.uint8).astype(np.float32) / np.float32(255.0)
    elif dtype == "f4":
        values = np.frombuffer(raw, "<f4").astype(np.float32)
    else:
        raise ValueError(f"malformed query in evidence record: unknown dtype {dtype!r}")
    if values.size != int(np.prod(shape)):
        raise ValueError(f"malformed query in evidence record: {values.size} values for shape {shape}")
    return values.reshape(shape)


def _with_labels(codes: list[bytes], top: np.ndarray) -> list[bytes]:
    """DAWN's selection and label codes: each query code followed by its clean label (4 bytes)."""
    return [code + int(t).to_bytes(4, "big") for code, t in zip(codes, top, strict=True)]


def keyed_uniforms(key: bytes, purpose: bytes, codes: list[bytes]) -> np.ndarray:
    """float64 [B] in [0, 1): HMAC-SHA256(key, purpose NUL code) read as a 64-bit fraction."""
    out = np.empty(len(codes), np.float64)
    for i, code in enumerate(codes):
        digest = hmac.new(key, purpose + b"\x00" + code, hashlib.sha256).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2.0**64
    return out


def _selection_params(params: Mapping[str, Any]) -> tuple[float, int, int]:
    """``rate``, ``levels`` and ``max_evidence``: the params every keyed-selection watermark reads."""
    rate = float(number(params, "rate", DEFAULT_RATE, low=0.0, high=0.5, low_inclusive=False))
    levels = int(number(params, "levels", DEFAULT_LEVELS, low=2, high=16, integer=True))
    max_evidence = int(number(params, "max_evidence", DEFAULT_MAX_EVIDENCE, low=1, integer=True))
    return rate, levels, max_evidence


def _watermark_key(secret: bytes) -> bytes:
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise ValueError("the watermark secret must be non-empty bytes")
    return bytes(secret)


def _checked_batch(outputs: np.ndarray, context: DefenseContext, expects: str) -> tuple[np.ndarray, np.ndarray]:
    """The answers [B, K >= 2] and the queries [B, ...] of ``context``; ``ValueError`` naming ``expects``
    otherwise."""
    out = np.asarray(outputs)
    if out.ndim != 2 or out.shape[1] < 2:
        raise ValueError(f"{expects}, got shape {out.shape}")
    inputs = np.asarray(context.batch.inputs)
    if len(inputs) != len(out):
        raise ValueError(f"batch has {len(inputs)} queries but {len(out)} answers")
    return out, inputs


@WATERMARKS.register("dawn")
class DAWN:
    """DAWN: Dynamic Adversarial Watermarking of Neural Networks (Szyller, Atli, Marchal, Asokan,
    ACM Multimedia 2021), for classifiers.

    A query is selected when HMAC(key, coarse code ‖ clean argmax) read as a fraction in [0, 1) is
    below ``rate``; the coarse code (7×7 pooled, ``levels`` grey levels) makes tiny pixel changes
    keep the decision, and the argmax spreads common codes over classes. A selected query gets a
    keyed wrong label w ≠ argmax, chosen by a second HMAC among the ``top_k`` most probable classes
    (all of them by default: w = (argmax + 1 + h mod (K − 1)) mod K, stable under small changes of
    the probabilities); its answer is the clean distribution with the probabilities of the argmax
    and w swapped, so hard- and soft-label thieves both learn w. Selection and label depend on the
    query only, not on the client, so sybil accounts get the same watermark and cannot vote it away.

    Params:
        rate: fraction r of queries watermarked, in (0, 0.5] (default 0.005).
        top_k: the wrong label comes from the top_k classes (default 0: all classes; else >= 2).
        levels: grey levels of the selection code, 2..16 (default 3, see ``DEFAULT_LEVELS``).
        max_evidence: evidence records kept per client (default 10,000, >= 1).

    Deviation from the paper: DAWN hashes the raw query, so a one-pixel change dodges it; here the
    coarse code is hashed (as the issue asks). Records keep ``p_clean``, the victim's own
    probability of w, from which ``moat verify`` bounds the chance match rate p₀.
    """

    name = "dawn"

    def __init__(self, params: Mapping[str, Any], *, kind: ModelKind, secret: bytes) -> None:
        check_keys(params, ("rate", "top_k", "levels", "max_evidence"))
        if kind != "classifier":
            raise ParamError("name", f"dawn changes class labels; it does not apply to a {kind}")
        self.rate, self.levels, self.max_evidence = _selection_params(params)
        self.query_levels = (self.levels,)  # codes every answer's queries: pooled ahead by the gateway
        self.top_k = int(number(params, "top_k", 0, low=0, integer=True))
        if self.top_k == 1:
            raise ParamError("top_k", "must be 0 (all classes) or >= 2, got 1")
        self._key = _watermark_key(secret)

    def _codes(self, inputs: np.ndarray, top: np.ndarray) -> list[bytes]:
        return _with_labels(query_codes(inputs, self.levels), top)

    def selected(self, inputs: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """bool [B]: which queries ``inputs`` [B, ...] with clean probabilities [B, K] are watermarked."""
        return self._selected(query_codes(inputs, self.levels), probs)

    def _selected(self, query_codes: list[bytes], probs: np.ndarray) -> np.ndarray:
        codes = _with_labels(query_codes, np.asarray(probs).argmax(axis=1))
        return keyed_uniforms(self._key, b"dawn/select", codes) < self.rate

    def labels(self, inputs: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """The keyed wrong label int64 [B] of each query (never the clean argmax; K >= 2)."""
        p = np.asarray(probs, dtype=np.float64)
        classes, top = p.shape[1], p.argmax(axis=1)
        u = keyed_uniforms(self._key, b"dawn/label", self._codes(inputs, top))
        if self.top_k == 0 or self.top_k >= classes:
            return (top + 1 + (u * (classes - 1)).astype(np.int64)) % classes
        order = np.argsort(-p, axis=1, kind="stable")
        rank = 1 + (u * (self.top_k - 1)).astype(np.int64)
        return order[np.arange(len(p)), rank]

    def mark(self, outputs: np.ndarray, context: DefenseContext) -> Marked:
        """Swap the argmax and the keyed label on selected rows: float32 [B, K] -> float32 [B, K]."""
        p, inputs = _checked_batch(outputs, context, "dawn expects probabilities [B, K] with K >= 2")
        # Selection reads the clean answer, so earlier defenses (which may be per client) do not
        # change which queries carry the watermark (its argmax: float32 and float64 agree).
        rows = np.nonzero(self._selected(context.query_codes(self.levels), context.batch.outputs))[0]
        if not len(rows):  # most answers: sent as they are, no copy
            return Marked(p if p.dtype == np.float32 else p.astype(np.float32))
        clean = np.asarray(context.batch.outputs, dtype=np.float64)
        out = p.astype(np.float32, copy=True)
        wrong = self.labels(inputs[rows], clean[rows])
        top = out[rows].argmax(axis=1)
        high, low = out[rows, top], out[rows, wrong]
        out[rows, top], out[rows, wrong] = low, high
        now = time.time()
        records = tuple({
            "time": now, "query": encode_query(inputs[i]), "label": int(w), "clean_label": int(clean[i].argmax()),
            "p_clean": float(clean[i, w]), "answer": [round(float(v), 7) for v in out[i]],
        } for i, w in zip(rows, wrong, strict=True))
        return Marked(out, rows.astype(np.int64), records)


def keyed_direction(key: bytes, code: bytes, dim: int) -> np.ndarray:
    """The unit vector float64 [dim] of a query code: a standard normal vector from a numpy
    Generator seeded with HMAC-SHA256(key, "direction/vector" NUL code), normalised (so uniform on
    the sphere, and independent between codes as far as HMAC is a random function)."""
    digest = hmac.new(key, b"direction/vector\x00" + code, hashlib.sha256).digest()
    v = np.random.default_rng(int.from_bytes(digest, "big")).standard_normal(dim)
    return v / np.linalg.norm(v)


def unit_rows(v: np.ndarray) -> np.ndarray:
    """Rows of float64 [B, D] scaled to norm 1 (zero rows stay zero)."""
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)


@WATERMARKS.register("direction")
class Direction:
    """Keyed-direction watermark for encoders: a keyed fraction of queries is answered with an
    embedding turned towards a keyed random direction of the embedding space.

    Selection (DAWN: Szyller, Atli, Marchal, Asokan, ACM Multimedia 2021): a query is selected when
    HMAC(key, coarse code) read as a fraction in [0, 1) is below ``rate``; the code is the query
    pooled to 7×7 and quantised to ``levels`` grey levels (``query_codes``), so near-duplicates keep
    the decision. Unlike DAWN's there is no argmax in the code (an encoder has none). Measured on
    20,000 Fashion-MNIST training images at 3 levels: 16,719 distinct codes, the largest holding
    1.0% of the images, and 94.8% of near-duplicates (every pixel ±1/255) keep their code.

    Answer: the selected query's answer e float32 [D] becomes e' = ‖e‖ · unit(ê + strength · u), with
    ê = e/‖e‖ and u the code's keyed unit vector (:func:`keyed_direction`). The norm is kept and,
    at strength 1, e' sits at ~45° from e and from u (cos ≈ 0.71 with each), where a random
    direction has |cos| ≈ 1/√D (0.09 at D = 128). Same query, same answer, for every client.

    Why a copy carries it: a thief fits its copy to the answers (MSE, cosine or InfoNCE losses all
    pull copy(x) towards e'(x)), so on the selected queries its outputs lean towards their u. A
    model that never saw the answers is independent of the key, and so is the clean answer e
    (kept in the record as ``clean``): cos(unit(model(x)) − ê, u) is then the first coordinate of
    a uniform point on the sphere (mean 0, variance 1/D), whatever the model. ``moat verify`` sums
    these cosines over the evidence (``gateway.verify.verify_encoder``). Measured on the demo
    encoder: copies fitted for 10 epochs to 10,000 answers lean by a mean cosine of ~0.1
    (p ≈ 1e-18 with MSE, 1e-13 with cosine loss); 5 epochs give p ≈ 3e-5 and 6e-4: the mark grows
    with the copy's fit. Strength 2 (a 63° turn) raised the lean by ~1.3x; 1 keeps the honest cost
    lower (a linear probe on the demo encoder lost 0.07 points at r = 0.5%).

    Basis: the marking is our design, close to EmbMarker (Peng et al., "Are You Copying My Model?",
    ACL 2023), which mixes one secret target embedding into the answers of an embedding service
    for queries holding trigger words. Here each selected query has its own direction: the
    cosines are then independent under H0 (an exact null, not one estimated from null models), and
    the watermarked answers share no common component that a thief could find by comparing them.

    Params:
        rate: fraction r of queries watermarked, in (0, 0.5] (default 0.005).
        levels: grey levels of the selection code, 2..16 (default 3, see ``DEFAULT_LEVELS``).
        strength: weight of u against ê, > 0 (default 1.0: a 45° turn).
        max_evidence: evidence records kept per client (default 10,000, >= 1).
    """

    name = "direction"

    def __init__(self, params: Mapping[str, Any], *, kind: ModelKind, secret: bytes) -> None:
        check_keys(params, ("rate", "levels", "strength", "max_evidence"))
        if kind != "encoder":
            raise ParamError("name", f"direction turns embeddings; it does not apply to a {kind} (use dawn)")
        self.rate, self.levels, self.max_evidence = _selection_params(params)
        self.query_levels = (self.levels,)  # codes every answer's queries: pooled ahead by the gateway
        self.strength = float(number(params, "strength", DEFAULT_STRENGTH, low=0.0, low_inclusive=False))
        self._key = _watermark_key(secret)

    def selected(self, inputs: np.ndarray) -> np.ndarray:
        """bool [B]: which queries ``inputs`` [B, ...] are watermarked."""
        return self._selected(query_codes(inputs, self.levels))

    def _selected(self, codes: list[bytes]) -> np.ndarray:
        return keyed_uniforms(self._key, b"direction/select", codes) < self.rate

    def directions(self, inputs: np.ndarray, dim: int) -> np.ndarray:
        """The keyed unit vectors float64 [B, dim] of queries ``inputs`` [B, ...]."""
        codes = query_codes(inputs, self.levels)
        return np.stack([keyed_direction(self._key, code, dim) for code in codes]) if codes else np.zeros((0, dim))

    def mark(self, outputs: np.ndarray, context: DefenseContext) -> Marked:
        """Turn the selected rows towards their keyed directions: float32 [B, D] -> float32 [B, D]."""
        e, inputs = _checked_batch(outputs, context, "direction expects embeddings [B, D] with D >= 2")
        rows = np.nonzero(self._selected(context.query_codes(self.levels)))[0]
        if not len(rows):  # most answers: sent as they are, no copy
            return Marked(e if e.dtype == np.float32 else e.astype(np.float32))
        out = e.astype(np.float32, copy=True)
        before = e[rows].astype(np.float64)
        u = self.directions(inputs[rows], e.shape[1])
        norms = np.linalg.norm(before, axis=1, keepdims=True)
        out[rows] = (norms * unit_rows(unit_rows(before) + self.strength * u)).astype(np.float32)
        # "clean" is the answer this client would have had (after the defenses: a per-client
        # transform, say): the frame its copy learns in, so the test measures departures from it.
        clean_cos = np.sum(unit_rows(before) * u, axis=1)
        now = time.time()
        records = tuple({
            "time": now, "query": encode_query(inputs[i]), "answer": [round(float(v), 7) for v in out[i]],
            "clean": [round(float(v), 7) for v in before[j]], "direction": [round(float(v), 7) for v in u[j]],
            "clean_cos": round(float(clean_cos[j]), 7),
        } for j, i in enumerate(rows))
        return Marked(out, rows.astype(np.int64), records)
