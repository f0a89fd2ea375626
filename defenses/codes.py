"""Coarse query codes: what the keyed defenses and watermarks hash instead of the raw query.

A query's first channel is average-pooled to a ≤7×7 grid and quantised to a few grey levels, so a
near-duplicate (a grey level or two per pixel) keeps its code and gets the same keyed answer.
Codes must stay bit-identical across versions: they pick misinformation's wrong labels and which
queries carry a watermark, and ``moat verify`` recomputes them from stored evidence.
"""

from __future__ import annotations

import functools
import struct

import numpy as np

__all__ = ["GRID", "LEVELS", "PooledQueries", "coarse_grid", "query_codes", "quantised_codes"]

#: Side of the pooled grid and number of grey levels of the coarse query code. Measured on 300
#: Fashion-MNIST test images x 50 near-duplicates each (every pixel +-1/255, clipped), the share of
#: near-duplicates keeping the code, and distinct codes among 5000 test images: 7x7 with 4 levels
#: 93.0% / 4931, 3 levels 95.0% / 4582, 2 levels 98.7% / 2876 (at +-2/255: 85.6%, 90.1%, 96.4%).
#: Two levels keep near-duplicates together and still separate most distinct images.
GRID = 7
LEVELS = 2


def query_codes(inputs: np.ndarray, levels: int = LEVELS) -> list[bytes]:
    """Coarse codes of queries: float [B, C, H, W] (also [B, H, W] or [B, F]) in [0, 1] -> B byte
    strings. The first channel is average-pooled to a ≤7×7 grid and quantised to ``levels`` grey
    levels (default 2: block mean below or above 0.5), so a change of a grey level or two per pixel
    rarely changes the code."""
    return quantised_codes(coarse_grid(inputs), levels)


def coarse_grid(inputs: np.ndarray) -> np.ndarray:
    """The pooled half of :func:`query_codes`: float [B, C, H, W] (also [B, H, W] or [B, F]) ->
    float64 [B, ≤7, ≤7], the first channel's block means. Each row's grid depends on that row alone."""
    x = np.asarray(inputs, dtype=np.float64)
    if x.ndim == 2:
        x = x[:, None, :]
    elif x.ndim >= 4:
        x = x.reshape(x.shape[0], -1, *x.shape[-2:])[:, 0]
    if x.ndim != 3:
        raise ValueError(f"queries must be [B, C, H, W], [B, H, W] or [B, F]; got shape {np.shape(inputs)}")
    return _pool(_pool(x, axis=1), axis=2)


def quantised_codes(grid: np.ndarray, levels: int) -> list[bytes]:
    """The quantised half of :func:`query_codes`: float64 [B, g, g'] block means -> B byte strings."""
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be in 2..256, got {levels}")
    # floor(v * levels) of v in [0, 1] is its truncation; np.minimum/np.maximum rather than np.clip,
    # whose Python wrapper cost more than the arithmetic (this runs on every classifier answer).
    unit = np.minimum(np.maximum(grid, 0.0), 1.0)
    quantised = np.minimum((unit * levels).astype(np.uint8), np.uint8(levels - 1))
    shape = struct.pack(">II", *quantised.shape[1:])
    return [shape + row.tobytes() for row in quantised]


class PooledQueries:
    """A batch's queries pooled once (:func:`coarse_grid`: ``grid`` float64 [B, g, g']) and their
    codes at each number of grey levels asked for, computed once: one answer's defenses and
    watermark share them, and the gateway computes them while the model computes the answer."""

    def __init__(self, grid: np.ndarray) -> None:
        self.grid = grid
        self._codes: dict[int, list[bytes]] = {}

    @classmethod
    def of(cls, inputs: np.ndarray, levels: tuple[int, ...] = ()) -> PooledQueries:
        """``inputs`` [B, ...] pooled, with their codes at each of ``levels`` computed now."""
        pooled = cls(coarse_grid(inputs))
        for n in levels:
            pooled.codes(n)
        return pooled

    def codes(self, levels: int) -> list[bytes]:
        """:func:`query_codes` of the batch's queries at ``levels`` grey levels (B byte strings)."""
        codes = self._codes.get(levels)
        if codes is None:
            codes = self._codes[levels] = quantised_codes(self.grid, levels)
        return codes


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
