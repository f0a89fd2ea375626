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

from collections.abc import Mapping
from typing import Any, ContextManager, Protocol, runtime_checkable

import numpy as np


class StoreUnavailable(ConnectionError):
    """The store cannot serve now: down, locked by another process past its wait, or out of disk.
    Stores raise it (or another ``ConnectionError``, ``TimeoutError`` or ``OSError``) for such
    conditions, and the gateway answers UNAVAILABLE; any other exception is a bug (INTERNAL)."""


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
    #: True when :meth:`transaction` groups calls into one atomic commit; False when it is a no-op
    #: (each call is atomic on its own), and the gateway overlaps calls instead.
    transactional: bool

    def transaction(self) -> ContextManager[None]:
        """A block whose calls (on this thread) commit together on exit and roll back together on
        an exception; a nested block undoes only its own writes. A no-op for stores that are not
        ``transactional``."""
        ...

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
