"""Keyed randomness for watermark rules: every choice a rule makes is drawn from a numpy Generator
seeded by HMAC-SHA256(key, purpose), so the server secret fixes the rule (replicas and the verifier
recompute it; nobody can pick it after seeing a suspect), and choices made for different purposes
are independent as far as HMAC is a random function. That independence is what the ownership
tests in :mod:`defenses.proof` rest on."""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

__all__ = ["HyperplaneCells", "keyed_generator", "keyed_unit_vectors"]


def keyed_generator(key: bytes, purpose: str) -> np.random.Generator:
    """A numpy Generator seeded with HMAC-SHA256(``key``, ``purpose``)."""
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ValueError("a watermark key must be non-empty bytes")
    digest = hmac.new(bytes(key), purpose.encode(), hashlib.sha256).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


def keyed_unit_vectors(key: bytes, purpose: str, count: int, dim: int) -> np.ndarray:
    """float64 [count, dim]: independent unit vectors, uniform on the sphere (normalised Gaussians)."""
    v = keyed_generator(key, purpose).standard_normal((count, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class HyperplaneCells:
    """A keyed partition of R^dim into 2^bits cells: the sign pattern of x·W for a keyed Gaussian
    W [dim, bits] (random-hyperplane LSH, Charikar 2002, as B4B's coverage uses). Hyperplanes pass
    through the origin, so the partition suits vectors spread around it (an encoder's
    BatchNorm'd embedding, a centred pooled image)."""

    def __init__(self, key: bytes, purpose: str, dim: int, bits: int) -> None:
        if dim < 1 or not 1 <= bits <= 16:
            raise ValueError(f"hyperplane cells need dim >= 1 and 1 <= bits <= 16, got dim={dim}, bits={bits}")
        self.dim, self.bits, self.count = dim, bits, 1 << bits
        self.planes = keyed_generator(key, purpose).standard_normal((dim, bits)).astype(np.float32)
        self._weights = (1 << np.arange(bits)).astype(np.int64)

    def of(self, x: np.ndarray) -> np.ndarray:
        """The cell int64 [B] in [0, 2^bits) of each row of ``x`` float [B, dim]."""
        v = np.asarray(x, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"expected vectors [B, {self.dim}], got shape {list(v.shape)}")
        return ((v @ self.planes) > 0).astype(np.int64) @ self._weights
