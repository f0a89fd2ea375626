"""B4B, "Bucks for Buckets" (Dubiński et al., NeurIPS 2023): coverage-priced noise and per-client
transformations for encoders.

A legitimate user solves one downstream task and touches a small part of the embedding space; a thief
has to cover all of it. The ``coverage`` detector measures how much of the space a client has reached
(percent of LSH buckets hit); this defense turns that into noise, ``σ(c) = max(0, λ·(exp(ln(α/λ)·c/β) − 1))``,
negligible for a narrow user and steep for a thief, and then maps every answer into a space of the
client's own, so answers collected by several sybil accounts cannot simply be pooled.

Keyed, stateless randomness: everything random here is derived from HMAC-SHA256 of the server secret,
so replicas agree and nothing is stored per client. The noise of a row is a function of (secret,
client, an LSH code of the row's answer), never redrawn per call: repeating a query, or sending
near-duplicates whose answers hash to the same code, returns the identical noisy answer, so averaging
recovers nothing (the counter-attack in REFERENCE.md §2, "Known counter-attacks").
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from contracts.batch import ModelKind
from contracts.params import ParamError, check_keys, choice, number
from defenses.base import DEFENSES, DefenseContext

__all__ = ["B4B", "TRANSFORMS", "ClientTransform", "client_bytes"]

TRANSFORMS = ("affine+shuffle", "affine", "shuffle", "none")
#: Smallest |scale| of the affine map: keeps it well-conditioned, so a client's own linear probe
#: (and the inverse map, for the owner) stays numerically sound.
_MIN_SCALE = 0.1
#: Default bound (MB) of the clients' derived transforms and noise keys kept (``cache_mb``): as the
#: SQLite store's write-back cache, so that the clients whose state is cached have theirs too: a
#: client not kept re-derives them, most of what a client not seen lately pays over a hot one.
DEFAULT_CACHE_MB = 256
#: Bytes a kept client costs beyond its arrays (dict entries, array headers), so that
#: :func:`client_bytes` matches the RSS a kept client adds.
_CLIENT_OVERHEAD = 1000
#: The coverage detector whose ``figures["coverage"]`` (percent) prices the noise.
COVERAGE_DETECTOR = "coverage"


def _framed(*parts: bytes) -> bytes:
    """``parts`` each length-prefixed, so that no two part lists share a message."""
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _keyed_digest(secret: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 of ``parts``, framed by :func:`_framed`."""
    return hmac.new(secret, _framed(*parts), hashlib.sha256).digest()


def _rng(digest: bytes) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(digest, "big"))


class _KeyedStreams(threading.local):
    """One PCG64 generator per thread, re-keyed for every row of noise and every client transform:
    setting its state costs ~1 µs where building a generator (``default_rng``: a SeedSequence, then
    PCG64) cost ~10 µs (~45 µs in the gateway, between requests, with cold caches)."""

    def __init__(self) -> None:
        self.bits = np.random.PCG64(0)
        self.generator = np.random.Generator(self.bits)


_STREAMS = _KeyedStreams()


def _keyed_generator(digest: bytes) -> np.random.Generator:
    """This thread's generator, re-keyed: a PCG64 whose 128-bit state and increment are the two
    halves of the 32-byte keyed ``digest`` (pseudorandom already: no seed mixing needed; the
    increment of a PCG stream must be odd). Valid until the thread's next call."""
    streams = _STREAMS
    streams.bits.state = {"bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
                          "state": {"state": int.from_bytes(digest[:16], "big"),
                                    "inc": int.from_bytes(digest[16:32], "big") | 1}}
    return streams.generator


def _keyed_normal(digest: bytes, size: int) -> np.ndarray:
    """``size`` standard normals (float64) from the generator keyed by ``digest``."""
    return _keyed_generator(digest).standard_normal(size)


def _check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise ValueError("the defense secret must be non-empty bytes")
    return bytes(secret)


@dataclass(frozen=True, slots=True)
class ClientTransform:
    """One client's map of the answer space onto itself: ``y = (x ⊙ scale + shift)[:, perm]``.

    Kept compact, for a gateway keeps one per active client: at 128 dims, 1.2 KB of arrays (float64
    and int64 ones took 3 KB; with their objects and the cache's, 3.6 KB a client against 1.9 KB
    now).

    Attributes:
        scale: float32 [D] with ``_MIN_SCALE <= |scale| <= 1``, or None (no affine part).
        shift: float32 [D] in [-1, 1), or None.
        perm: unsigned integers [D] (the smallest dtype that holds D - 1), a permutation of the D
            dimensions, or None (no shuffle).
    """

    scale: np.ndarray | None
    shift: np.ndarray | None
    perm: np.ndarray | None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Map float64 rows [B, D] into the client's space (float64 [B, D]: the float32 scale and
        shift are exact in float64)."""
        if self.scale is not None and self.shift is not None:
            x = x * self.scale + self.shift
        if self.perm is not None:
            x = x[:, self.perm]
        return x


@DEFENSES.register("b4b")
class B4B:
    """B4B (Dubiński et al., "Bucks for Buckets (B4B): Active Defenses Against Stealing Encoders",
    NeurIPS 2023) for encoders: answer ``T_client(e + N(0, σ(c)²·I))``.

    Params:
        transform: ``affine+shuffle`` (default), ``affine``, ``shuffle`` or ``none``. ``affine`` is
            ``x ⊙ s + t`` with ``t ~ U(−1, 1)^d`` and ``s ~ U(−1, 1)^d`` conditioned on ``|s| >= 0.1``
            (well-conditioned); ``shuffle`` is a keyed permutation of the d dimensions.
        alpha, beta, lam: the cost function's α (0.8), β (80) and λ (1e-6); ``0 < lam < alpha``.
        code_bits: bits of the LSH code that keys each row's noise (default 16, 1..64).
        cache_mb: bound of the derived transforms and noise keys kept (default 256; ~2 KB a
            client at 128 dims, :func:`client_bytes`; 0 derives them on every request).

    Deviations from the paper: its pad-and-shuffle appends d fixed N(0, 1) values before shuffling,
    which would double the declared output shape; here the shuffle permutes the d dimensions only.
    The paper draws fresh noise per answer; here it is a deterministic function of (secret, client,
    LSH code of the answer) so that averaging repeated or near-duplicate queries gains nothing.
    Noise is added before the transform, as in the paper. Coverage is read from the ``coverage``
    detector's verdict (0 when absent, so a model without that detector gets the transform only).
    """

    name = "b4b"

    def __init__(self, params: Mapping[str, Any], *, kind: ModelKind, secret: bytes) -> None:
        check_keys(params, ("transform", "alpha", "beta", "lam", "code_bits", "cache_mb"))
        if kind != "encoder":
            raise ParamError("name", f"b4b protects encoders only, not a {kind}")
        self.transform: str = choice(params, "transform", "affine+shuffle", TRANSFORMS)
        self.alpha = float(number(params, "alpha", 0.8, low=0.0, low_inclusive=False))
        self.beta = float(number(params, "beta", 80, low=0.0, low_inclusive=False))
        self.lam = float(number(params, "lam", 1e-6, low=0.0, low_inclusive=False))
        if self.lam >= self.alpha:
            raise ParamError("lam", f"must be < alpha ({self.alpha}) so the cost grows with coverage, got {self.lam}")
        self.code_bits: int = number(params, "code_bits", 16, low=1, high=64, integer=True)
        self._secret = _check_secret(secret)
        self._rate = math.log(self.alpha / self.lam) / self.beta
        self._planes: dict[int, np.ndarray] = {}  # dim -> hyperplanes; a constant derived from the secret
        self.cache_bytes = int(number(params, "cache_mb", DEFAULT_CACHE_MB, low=0, high=1 << 20) * 2**20)
        self._clients: dict[int, Callable[[str], _Client]] = {}  # dim -> its clients' cache

    def sigma(self, coverage: float) -> float:
        """Noise standard deviation for ``coverage`` in percent: ``max(0, λ·(exp(ln(α/λ)·c/β) − 1))``.

        Coverage is clamped to [0, 100]; a non-finite value counts as 100 (fail closed: most noise).
        """
        c = float(coverage)
        c = 100.0 if not math.isfinite(c) else min(max(c, 0.0), 100.0)
        return max(0.0, self.lam * math.expm1(self._rate * c))

    def client_transform(self, client: str, dim: int) -> ClientTransform:
        """``client``'s keyed transform of a ``dim``-wide answer (deterministic in secret, client, dim);
        kept for the last ``cache_mb`` worth of clients (see :meth:`_client`)."""
        return self._client(client, dim).transform

    def _client(self, client: str, dim: int) -> _Client:
        """What ``client`` needs for ``dim``-wide answers, derived or kept: the least recently used
        clients are dropped beyond ``cache_mb`` (:func:`client_bytes` each)."""
        cached = self._clients.get(dim)
        if cached is None:
            size = self.cache_bytes // client_bytes(dim)
            cached = self._clients.setdefault(dim, functools.lru_cache(maxsize=size)(
                functools.partial(self._derive_client, dim=dim)))
        return cached(client)

    def _derive_client(self, client: str, dim: int) -> _Client:
        return _Client(self._derive_transform(client, dim), self._noise_key(client))

    def _derive_transform(self, client: str, dim: int) -> ClientTransform:
        rng = _keyed_generator(_keyed_digest(self._secret, b"b4b/transform", client.encode(), str(dim).encode()))
        # Always draw all three so that switching `transform` never changes the other parts.
        magnitude, sign, shift = rng.random((3, dim))
        magnitude = _MIN_SCALE + (1.0 - _MIN_SCALE) * magnitude
        scale = np.where(sign < 0.5, -magnitude, magnitude).astype(np.float32)
        shift = (2.0 * shift - 1.0).astype(np.float32)
        perm = rng.permutation(dim).astype(np.min_scalar_type(max(dim - 1, 0)))
        affine = self.transform in ("affine", "affine+shuffle")
        shuffle = self.transform in ("shuffle", "affine+shuffle")
        return ClientTransform(scale if affine else None, shift if affine else None, perm if shuffle else None)

    def codes(self, outputs: np.ndarray) -> np.ndarray:
        """LSH codes of answer rows: float [B, D] -> uint64 [B], the signs against ``code_bits`` keyed
        random hyperplanes through the origin (angular LSH), so nearby answers share a code."""
        x = np.asarray(outputs, dtype=np.float64)
        bits = (x @ self._hyperplanes(x.shape[1])) > 0.0  # bool [B, code_bits]
        # Bit j of a code is hyperplane j's sign: the bits packed little-endian into 8 bytes, read
        # as one little-endian uint64 (a third of the multiply-and-sum's time per request).
        packed = np.zeros((len(x), 8), np.uint8)
        packed[:, :(self.code_bits + 7) // 8] = np.packbits(bits, axis=1, bitorder="little")
        return packed.view("<u8")[:, 0].astype(np.uint64)

    def noise(self, outputs: np.ndarray, client: str) -> np.ndarray:
        """Unit-variance noise float64 [B, D] for answer rows ``outputs`` [B, D]: row i is a standard
        normal vector keyed by (secret, client, code_i) (:func:`_noise_seed`), so rows sharing a code
        share the noise."""
        x = np.asarray(outputs)
        return self._noise(x, self._client(client, x.shape[1]).noise_key)

    def _noise(self, x: np.ndarray, key: bytes) -> np.ndarray:
        """:meth:`noise` of rows ``x`` [B, D] for the client whose noise key is ``key``."""
        codes = self.codes(x)
        if len(codes) == 1:  # most requests: one row, no grouping by code
            return _keyed_normal(_noise_seed(key, int(codes[0])), x.shape[1])[None]
        out = np.empty(x.shape, dtype=np.float64)
        for code in np.unique(codes):
            out[codes == code] = _keyed_normal(_noise_seed(key, int(code)), x.shape[1])
        return out

    def _noise_key(self, client: str) -> bytes:
        """``client``'s noise key: HMAC(secret, [b"b4b/noise", client]) (as :func:`_keyed_digest`),
        32 bytes that key the BLAKE2b of its rows' noise seeds (:func:`_noise_seed`)."""
        return _keyed_digest(self._secret, b"b4b/noise", client.encode())

    def apply(self, outputs: np.ndarray, context: DefenseContext) -> np.ndarray:
        """Noisy, transformed answer: float32 [B, D] in, float32 [B, D] out (input left untouched)."""
        x = np.asarray(outputs)
        if x.ndim != 2:
            raise ValueError(f"b4b expects answers [B, D], got shape {x.shape}")
        sigma = self.sigma(_coverage(context))
        kept = self._client(context.client, x.shape[1])
        answer = x.astype(np.float64)
        if sigma > 0.0 and len(x):
            answer = answer + sigma * self._noise(x, kept.noise_key)
        return kept.transform(answer).astype(np.float32)

    def _hyperplanes(self, dim: int) -> np.ndarray:
        planes = self._planes.get(dim)
        if planes is None:
            rng = _rng(_keyed_digest(self._secret, b"b4b/lsh", str(dim).encode(), str(self.code_bits).encode()))
            planes = self._planes[dim] = rng.standard_normal((dim, self.code_bits))
        return planes


@dataclass(frozen=True, slots=True)
class _Client:
    """What B4B derives for one client and ``dim``-wide answers, kept together: one cache lookup a
    request for both."""

    transform: ClientTransform
    noise_key: bytes  # 32 bytes (see B4B._noise_key)


def client_bytes(dim: int) -> int:
    """Bytes one client's kept :class:`_Client` costs for ``dim``-wide answers: float32 scale and
    shift, the permutation (1 byte an index up to 256 dims, 2 up to 65,536), and the objects."""
    return dim * (8 + np.min_scalar_type(max(dim - 1, 0)).itemsize) + _CLIENT_OVERHEAD


def _noise_seed(key: bytes, code: int) -> bytes:
    """The noise seed of a row whose answer has LSH ``code``: BLAKE2b keyed by the client's noise
    ``key`` over the code's 8 big-endian bytes, 32 bytes. A keyed BLAKE2b, not an HMAC, since a
    client's key is kept as 32 bytes where an HMAC state held ~0.8 KB of OpenSSL contexts, and it
    costs half as much a row."""
    return hashlib.blake2b(code.to_bytes(8, "big"), key=key, digest_size=32).digest()


def _coverage(context: DefenseContext) -> float:
    """The client's coverage in percent from the coverage detector's verdict; 0 when absent."""
    verdict = context.verdicts.get(COVERAGE_DETECTOR)
    if verdict is None:
        return 0.0
    return float(verdict.figures.get("coverage", 0.0))
