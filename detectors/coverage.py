"""B4B's coverage detector: how much of the representation space a client's queries have touched.

Dubiński, Pawlak, Boenisch, Trzciński, Dziedzic, "Bucks for Buckets (B4B): Active Defenses Against
Stealing Encoders", NeurIPS 2023. Legitimate users solve one downstream task and touch a small part of
the space; a thief must cover it all. Coverage is measured with T locality-sensitive hash tables of b
random hyperplanes each; the published code precomputes it offline per batch index, this module keeps
it online, per client and model, in the state store (a bitmap of T * 2^b bits).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from contracts.batch import ModelKind, QueryBatch, Verdict
from contracts.params import ParamError, check_keys, choice, number
from contracts.state import StateStore, client_key
from detectors.base import DETECTORS

SOURCES = ("auto", "output", "embedding", "pixels")
_PARAMS = ("tables", "bits", "source", "pixel_center", "alert_coverage")


def seed_sequence(seed: int, *parts: int) -> np.random.SeedSequence:
    """A SeedSequence for ``seed`` (any Python int, the server secret's digest may be negative or
    wider than 64 bits) and the integer ``parts`` that name what it seeds."""
    return np.random.SeedSequence([int(seed) % (1 << 128), *parts])


class FixedProjection:
    """``x @ matrix.T`` for a fixed float32 ``matrix`` [out, in], by numpy's BLAS.

    Not ``faiss.LinearTransform``: its per-call overhead dominates the gateway's one-row requests."""

    def __init__(self, matrix: np.ndarray) -> None:
        self._transposed = np.ascontiguousarray(np.asarray(matrix, dtype=np.float32).T)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """float32 [n, in] -> float32 [n, out]."""
        return np.asarray(x, dtype=np.float32) @ self._transposed


class LSHHasher:
    """T tables of b random Gaussian hyperplanes through the origin for one input dimension.

    The T * b hyperplanes form one float32 matrix [T*b, d] (one BLAS sgemm for the whole batch and
    all tables). ``faiss.IndexLSH`` was rejected: its rotation is seeded with a constant inside
    FAISS (every deployment would share hyperplanes, and T tables would need T indexes), its rows
    are orthonormalised rather than Gaussian as in B4B, and its packed codes put a 12-bit bucket
    across byte boundaries.
    """

    def __init__(self, dim: int, tables: int, bits: int, seed: int) -> None:
        self.dim, self.tables, self.bits = dim, tables, bits
        rng = np.random.default_rng(seed_sequence(seed, 0xB4B, dim, tables, bits))
        planes = rng.standard_normal((tables * bits, dim)).astype(np.float32)
        self._transform = FixedProjection(planes)
        # Bit j of a bucket is the sign of the j-th hyperplane of the table.
        self._weights = (1 << np.arange(bits, dtype=np.int64))

    def buckets(self, x: np.ndarray) -> np.ndarray:
        """Bucket of each vector in each table: float32 [n, dim] -> int64 [n, tables] in [0, 2^bits)."""
        projected = self._transform.apply(x)
        signs = (projected > 0).reshape(len(x), self.tables, self.bits).astype(np.int64)
        return signs @ self._weights


class CoverageDetector:
    """B4B coverage (Dubiński et al., NeurIPS 2023): percent of LSH buckets a client has hit.

    State per client and model: one bitmap of ``tables * 2**bits`` bits under
    ``client_key("cov", model, client, "<tables>x<bits>")`` (table t's buckets are bits
    ``[t * 2**bits, (t+1) * 2**bits)``; the geometry is in the key so a changed config starts a new
    bitmap instead of misreading the old one) and a query counter in the hash
    ``client_key("cov", model, client, "stats")``. Coverage c = mean over tables of
    100 * |S_t| / 2**bits. The cost of an observation is independent of the client's history (one
    bitmap of fixed size). Score: ``min(1, c / alert_coverage)``, so 1 means at the alert threshold.
    """

    name = "coverage"

    def __init__(self, params: Mapping[str, Any], *, store: StateStore, kind: ModelKind, seed: int) -> None:
        check_keys(params, _PARAMS)
        self.tables: int = number(params, "tables", 20, low=1, high=256, integer=True)
        self.bits: int = number(params, "bits", 12, low=3, high=16, integer=True)
        self.source: str = choice(params, "source", "auto", SOURCES)
        self.pixel_center: float = float(number(params, "pixel_center", 0.5))
        self.alert_coverage: float = float(number(params, "alert_coverage", 50, low=0, high=100,
                                                  low_inclusive=False))
        if kind not in ("classifier", "encoder"):
            raise ParamError("kind", f"must be classifier or encoder, got {kind!r}")
        self.kind = kind
        self.store = store
        self.seed = int(seed)
        self.segment_bits = 1 << self.bits
        self.total_bits = self.tables * self.segment_bits
        self._offsets = np.arange(self.tables, dtype=np.int64) * self.segment_bits  # table t's first bit
        # Hashers are a pure function of (seed, dim): a cache, not client state.
        self._hashers: dict[int, LSHHasher] = {}
        self._lock = threading.Lock()

    def observe(self, client: str, batch: QueryBatch) -> Verdict:
        """Hash the batch's vectors, set their buckets in the client's bitmap, return the coverage."""
        vectors = self._vectors(batch)
        key = self._bitmap_key(batch.model, client)
        stats_key = client_key("cov", batch.model, client, "stats")
        queries = self.store.incr(stats_key, {"queries": len(vectors)})["queries"]
        if len(vectors):
            positions = (self._hasher(vectors.shape[1]).buckets(vectors) + self._offsets).ravel()
            if len(vectors) > 1:  # one query's positions are one per table: sorted and distinct already
                positions = np.unique(positions)
            counts = self.store.set_bits(key, positions, self.total_bits, self.segment_bits)
        else:
            counts = self.store.count_bits(key, self.total_bits, self.segment_bits)
        return self._verdict(counts, queries)

    def peek(self, client: str, model: str) -> Verdict:
        """The client's coverage now; reads the store only."""
        key = self._bitmap_key(model, client)
        counts = self.store.count_bits(key, self.total_bits, self.segment_bits)
        queries = float(self.store.get_fields(client_key("cov", model, client, "stats")).get("queries", 0.0))
        return self._verdict(counts, queries)

    def _bitmap_key(self, model: str, client: str) -> str:
        return client_key("cov", model, client, f"{self.tables}x{self.bits}")

    def _verdict(self, counts: np.ndarray, queries: float) -> Verdict:
        # Plain floats: numpy's mean and clip on 20 numbers cost more than the arithmetic.
        coverage = 100.0 * float(counts.sum()) / (len(counts) * self.segment_bits)
        return Verdict(
            detector=self.name,
            score=min(1.0, max(0.0, coverage / self.alert_coverage)),
            figures={"coverage": coverage, "queries": float(queries)},
            alert=coverage >= self.alert_coverage,
        )

    def _vectors(self, batch: QueryBatch) -> np.ndarray:
        """What gets hashed, float32 [B, D]: the clean output, the embedding or centred pixels."""
        source = self.source
        if source == "auto":
            if self.kind == "encoder":
                source = "output"
            else:
                source = "embedding" if batch.embeddings is not None else "pixels"
        if source == "output":
            vectors = batch.outputs
        elif source == "embedding":
            if batch.embeddings is None:
                raise ValueError("coverage: source 'embedding' needs query embeddings, the batch has none")
            vectors = batch.embeddings
        else:
            # Hyperplanes pass through the origin: uncentred pixels (all >= 0) would land in one orthant.
            flat = np.asarray(batch.inputs, dtype=np.float32).reshape(len(batch.inputs), -1)
            vectors = flat - np.float32(self.pixel_center)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise ValueError(f"coverage: expected vectors [B, D], got shape {vectors.shape}")
        return vectors

    def _hasher(self, dim: int) -> LSHHasher:
        hasher = self._hashers.get(dim)
        if hasher is None:
            with self._lock:
                hasher = self._hashers.get(dim)
                if hasher is None:
                    hasher = LSHHasher(dim, self.tables, self.bits, self.seed)
                    self._hashers[dim] = hasher
        return hasher


@DETECTORS.register("coverage")
def create_coverage(params: Mapping[str, Any], *, store: StateStore, kind: ModelKind, seed: int) -> CoverageDetector:
    """Registry factory: ``ParamError`` names a bad parameter."""
    return CoverageDetector(params, store=store, kind=kind, seed=seed)
