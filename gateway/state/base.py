"""The state-store contract: what detectors, defenses, alerts and evidence keep per client.

Stores hold a few kinds of values under string keys (callers build them with :func:`client_key`:
``"<model>/<client>/<kind>"``, so everything of one client on one model shares a prefix and
resetting a client is one :meth:`StateStore.delete`):

- **bitmaps** of a fixed number of bits, split into equal segments (B4B's per-table bucket sets);
- **hashes** of numeric fields (counters, thresholds, suspicion) and text fields (status);
- **bounded lists** of fixed-width float32 rows (PRADA's growing sets) or float64 values;
- **streams** of JSON records with increasing integer ids (alerts, watermark evidence).

Every method is atomic on its own, so concurrent requests lose no update; the store is the
source of truth so that gateway replicas can share it. Implementations: ``memory`` (tests and
single-process experiments), ``sqlite`` (the embedded default, one WAL file that survives
restarts) and ``redis`` (shared by replicas). Methods are synchronous: the gateway calls them
from a worker thread, and researchers can use them offline without an event loop.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from gateway.params import ConfigError
from gateway.registry import Registry


def client_key(kind: str, model: str, client: str, *parts: str) -> str:
    """The key of one kind of state of one client on one model, e.g. ``clf/alice/cov``."""
    return "/".join((model, client, kind, *parts))


def evidence_stream(model: str, client: str) -> str:
    """The stream of ``client``'s watermark evidence on ``model``. It starts with ``/``, which no
    model name does, so resetting a client keeps its evidence: proof of theft outlives a reset."""
    return f"/evidence/{model}/{client}"


def client_prefix(model: str, client: str) -> str:
    """The prefix of every key of ``client`` on ``model`` (for reset)."""
    return f"{model}/{client}/"


@runtime_checkable
class StateStore(Protocol):
    """Durable per-client state; see the module docstring for the value kinds."""

    #: True when no call waits on a network (the gateway may call it on its event loop).
    local: bool

    def set_bits(self, key: str, positions: np.ndarray, total_bits: int, segment_bits: int) -> np.ndarray:
        """Set ``positions`` (int64 [n], each in [0, total_bits)) and return the number of set bits
        in each segment: int64 [total_bits // segment_bits]. Creates the bitmap when absent."""
        ...

    def count_bits(self, key: str, total_bits: int, segment_bits: int) -> np.ndarray:
        """Set bits per segment, int64 [total_bits // segment_bits]; zeros when absent."""
        ...

    def bitmap_bytes(self, key: str) -> int:
        """Bytes the bitmap takes in the store (0 when absent)."""
        ...

    def incr(self, key: str, fields: Mapping[str, float]) -> dict[str, float]:
        """Add each amount to its numeric field (absent = 0) and return the new values."""
        ...

    def set_fields(self, key: str, fields: Mapping[str, float | str]) -> None:
        """Overwrite fields of a hash."""
        ...

    def get_fields(self, key: str) -> dict[str, float | str]:
        """All fields of a hash; numbers come back as float, text as str; empty when absent."""
        ...

    def update_fields(self, key: str, put: Mapping[str, float | str], add: Mapping[str, float]) -> dict[str, float]:
        """Overwrite ``put``'s fields (as :meth:`set_fields`) and add ``add``'s amounts to their
        numeric fields (as :meth:`incr`) in one operation: one round trip to a remote store, where
        the two calls were two. Returns the added fields' new values. ``ValueError``, with nothing
        written, when a field is in both or an added-to field holds text."""
        ...

    def push_rows(self, key: str, rows: np.ndarray, max_rows: int) -> int:
        """Append float32 rows [n, d] (d fixed per key), keep the newest ``max_rows``; return the count."""
        ...

    def get_rows(self, key: str, dim: int) -> np.ndarray:
        """The stored rows, float32 [n, dim], oldest first; [0, dim] when absent. May be read-only
        (stores hand out their own window instead of a copy)."""
        ...

    def append_record(self, stream: str, record: Mapping[str, Any], max_records: int | None = None) -> int:
        """Append a JSON-serialisable record; return its id (increasing per stream, from 1).
        With ``max_records`` the oldest records beyond it are dropped."""
        ...

    def read_records(self, stream: str, after_id: int = 0, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        """Records with id > ``after_id``, oldest first, at most ``limit``."""
        ...

    def delete(self, prefix: str) -> int:
        """Delete every key and stream starting with ``prefix``; return how many went."""
        ...

    def close(self) -> None:
        """Flush and release; the store must not be used afterwards."""
        ...


STATE_STORES: Registry[StateStore] = Registry("state store")
_STORE_MODULES = {
    "memory": "gateway.state.memory",
    "sqlite": "gateway.state.sqlite",
    "redis": "gateway.state.redis_store",
}


def create_store(name: str, params: Mapping[str, Any], where: str = "state") -> StateStore:
    """Build the store registered as ``name``; ``ConfigError`` names the bad field."""
    module = _STORE_MODULES.get(name)
    if module is not None and name not in STATE_STORES:
        importlib.import_module(module)
    try:
        factory = STATE_STORES.get(name)
    except KeyError:
        valid = ", ".join(sorted(set(STATE_STORES.names()) | set(_STORE_MODULES)))
        raise ConfigError(f"{where}.name", f"unknown state store {name!r}; valid: {valid}") from None
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
    if segment_bits % 8 == 0:  # whole bytes per segment: popcount them (6x faster than unpacking 10 KB)
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
