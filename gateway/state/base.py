"""Building the state store a config names, and helpers the store implementations share.

The contract every store fulfils is :class:`contracts.state.StateStore`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from contracts.params import ConfigError
from contracts.registry import Registry
from contracts.state import StateStore

STATE_STORES: Registry[StateStore] = Registry(
    "state store", group="moat.state_stores",
    builtins={"memory": "gateway.state.memory", "sqlite": "gateway.state.sqlite",
              "redis": "gateway.state.redis_store"})


def create_store(name: str, params: Mapping[str, Any], where: str = "state") -> StateStore:
    """Build the store registered as ``name``; ``ConfigError`` names the bad field."""
    try:
        factory = STATE_STORES.get(name)
    except KeyError as error:
        raise ConfigError(f"{where}.name", str(error.args[0])) from None
    return factory(params, f"{where}.params")


def field_values(key: str, put: Mapping[str, float | str],
                 add: Mapping[str, float] | None = None) -> dict[str, float | str]:
    """``put`` as a hash stores it (text stays ``str``, anything else becomes a float), checked
    before any write: ``ValueError`` names a value that is neither, or a field also in ``add``."""
    both = sorted(set(put) & set(add or ()))
    if both:
        raise ValueError(f"field {both[0]!r} of {key!r} is both set and added to in one update")
    values: dict[str, float | str] = {}
    for name, value in put.items():
        try:
            values[name] = value if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"field {name!r} of {key!r}: {value!r} is neither text nor a number") from None
    return values


def segment_counts(bits: np.ndarray, segment_bits: int) -> np.ndarray:
    """Set bits per segment of a packed little-endian-bit bitmap (uint8 [total_bits // 8]):
    int64 [total_bits // segment_bits]."""
    if segment_bits % 64 == 0 and bits.size % 8 == 0:  # whole words per segment: popcount 8 bytes at a time
        return np.bitwise_count(bits.view(np.uint64)).reshape(-1, segment_bits // 64).sum(axis=1, dtype=np.int64)
    if segment_bits % 8 == 0:  # whole bytes per segment: popcount them (much faster than unpacking)
        return np.bitwise_count(bits).reshape(-1, segment_bits // 8).sum(axis=1, dtype=np.int64)
    unpacked = np.unpackbits(bits, bitorder="little")
    return unpacked.reshape(-1, segment_bits).sum(axis=1, dtype=np.int64)


def packed_with_bits(bits: np.ndarray | None, positions: np.ndarray, total_bits: int) -> np.ndarray:
    """A copy of the packed bitmap (uint8 [total_bits // 8]) with ``positions`` set."""
    if total_bits % 8:
        raise ValueError(f"total_bits must be a multiple of 8, got {total_bits}")
    out = np.zeros(total_bits // 8, np.uint8) if bits is None else bits.copy()
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and (positions.min() < 0 or positions.max() >= total_bits):
        raise ValueError(f"bit positions must lie in [0, {total_bits})")
    np.bitwise_or.at(out, positions >> 3, (1 << (positions & 7)).astype(np.uint8))
    return out


def rows_from_blobs(blobs: list[bytes], dim: int, width: int | None = None) -> np.ndarray:
    """Stored float32 row bytes (one or more rows per blob), oldest first, as float32 [n, width];
    [0, dim] when there are none. ``width`` is the stored width (as the memory store returns what it
    holds); None means each blob is exactly one row."""
    if not blobs:
        return np.zeros((0, dim), np.float32)
    width = width if width is not None else len(blobs[0]) // 4
    return np.frombuffer(b"".join(blobs), np.float32).reshape(-1, width)  # read-only, as get_rows allows


def newest_rows(current: np.ndarray | None, rows: np.ndarray, max_rows: int) -> np.ndarray:
    """``current`` float32 [n, d] (None: none yet) then ``rows`` [m, d], the newest ``max_rows``, as
    a new read-only array: one copy of what is kept (PRADA's 300-row sets grow by a row per query)."""
    if current is None:
        kept = rows[-max_rows:].copy()
    else:
        keep = max(0, min(len(current), max_rows - len(rows)))
        kept = np.concatenate([current[len(current) - keep:], rows[-max_rows:]])
    kept.flags.writeable = False
    return kept
