"""The SQLite store's bitmaps: a sorted list of set positions while few bits are set, packed bits after.

A coverage bitmap has ``tables * 2**bits`` bits (81,920 for the demo encoder: 10 KB packed), but an
honest client, who asks about one narrow task, sets a few hundred of them (B4B's premise). Stored
packed, every client cost 10 KB of file and of the write-back cache whatever it had asked, so a
cache of 256 MB held ~20,000 clients and a store of 100,000 clients was a 1.3 GB file in which
every request read and rewrote a blob over two overflow pages (``moat bench``: the protect stage
of a client not seen lately cost 1.9x that of one of 10 clients, half of it the bitmap's SQL).

A bit set here is one of two numpy arrays, told apart by dtype:

- *sparse*: ``uint32`` little-endian [n], the set positions, sorted and distinct (4 bytes a bit);
- *dense*: ``uint8`` [total_bits // 8], packed little-endian bits, as the memory store keeps them.

A set is sparse while that is smaller than its packed form (fewer than ``total_bits / 32`` bits)
and becomes dense for good once it is not. Both are immutable here: every change returns a new
array (the write-back cache journals the old one for a savepoint's rollback).
"""

from __future__ import annotations

import numpy as np

from gateway.state.base import packed_with_bits, segment_counts

__all__ = ["SPARSE", "add_bits", "bit_counts", "from_blob", "is_sparse"]

SPARSE = np.dtype("<u4")
_MAX_SPARSE_TOTAL = 1 << 32  # positions must fit a uint32; wider bitmaps are always packed


def is_sparse(bits: np.ndarray) -> bool:
    """Whether ``bits`` is a sparse set (uint32 positions) rather than a packed bitmap."""
    return bits.dtype == SPARSE


def from_blob(blob: bytes, sparse: bool) -> np.ndarray:
    """A stored set, read-only over ``blob``: uint32 [n] positions, or uint8 [total_bits // 8]."""
    return np.frombuffer(blob, SPARSE if sparse else np.uint8)


def bit_counts(bits: np.ndarray, total_bits: int, segment_bits: int) -> np.ndarray:
    """Set bits per segment of either form: int64 [total_bits // segment_bits]."""
    if is_sparse(bits):
        return np.bincount(bits.astype(np.int64) // segment_bits, minlength=total_bits // segment_bits)
    return segment_counts(bits, segment_bits)


def add_bits(current: np.ndarray | None, positions: np.ndarray, total_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Set ``positions`` (int64 [n], each in [0, total_bits)) in ``current`` (either form, or None for
    a set not stored yet). Returns ``(bits, new)``: the resulting set (``current`` itself when it
    held every position already, so a caller can skip writing it) and the positions that were not
    set before, sorted int64 [k]."""
    positions = np.asarray(positions, dtype=np.int64)
    if np.any(positions[1:] <= positions[:-1]):  # coverage hands one query's sorted, distinct bits
        positions = np.unique(positions)
    if positions.size and (positions[0] < 0 or positions[-1] >= total_bits):
        raise ValueError(f"bit positions must lie in [0, {total_bits})")
    if current is None:
        current = np.zeros(0, SPARSE) if total_bits <= _MAX_SPARSE_TOTAL else np.zeros(total_bits // 8, np.uint8)
        if not positions.size:
            return current, positions
    if is_sparse(current):
        return _add_sparse(current, positions, total_bits)
    return _add_dense(current, positions, total_bits)


def _add_sparse(current: np.ndarray, positions: np.ndarray, total_bits: int) -> tuple[np.ndarray, np.ndarray]:
    # Few numpy calls, for they cost more than the arithmetic on a few hundred positions (np.insert
    # and a masked lookup took 17 us per request; this, 5).
    if len(current):
        at = np.minimum(np.searchsorted(current, positions), len(current) - 1)
        new = positions[current[at] != positions]
    else:
        new = positions
    if not new.size:
        return current, new
    if 4 * (len(current) + len(new)) >= total_bits // 8:  # no longer smaller than packed: packed from now on
        return packed_with_bits(None, np.concatenate((current, new)), total_bits), new
    merged = np.concatenate((current, new.astype(SPARSE)))
    merged.sort(kind="stable")  # two sorted runs: timsort merges them in one pass
    return merged, new


def _add_dense(current: np.ndarray, positions: np.ndarray, total_bits: int) -> tuple[np.ndarray, np.ndarray]:
    if current.size * 8 != total_bits:
        raise ValueError(f"the stored bitmap has {current.size * 8} bits, not {total_bits}")
    masks = np.left_shift(1, positions & 7).astype(np.uint8)
    fresh = (current[positions >> 3] & masks) == 0
    if not fresh.any():
        return current, positions[:0]
    bits = current.copy()  # never in place: a savepoint's journal may hold the old array
    at, masks = positions[fresh] >> 3, masks[fresh]
    if np.any(at[1:] == at[:-1]):  # two new bits in one byte (sorted: neighbours): or them both
        np.bitwise_or.at(bits, at, masks)
    else:
        bits[at] |= masks
    return bits, positions[fresh]
