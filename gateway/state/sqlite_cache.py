"""A write-back cache for :class:`gateway.state.sqlite.SqliteStore` transactions.

Inside a transaction, bitmaps, hashes and row windows are read from and written to this
per-thread cache; the changed ones are written back in a few ``executemany`` calls just before
the COMMIT. ``moat bench`` showed why: a protected request made ~25 SQL statements, each a GIL
release and re-acquire, and those statements, not the detectors' arithmetic, were most of the
detection worker's time under load (with the memory store instead, full protection kept 0.68–0.71×
the bare proxy's throughput instead of 0.41×).

Correctness:
- the cache is used only inside a write transaction (``BEGIN IMMEDIATE``, so no other connection
  writes meanwhile), and it is dropped at the start of a transaction when ``PRAGMA data_version``
  says another connection (another gateway process on the file, an admin thread) committed since;
- a savepoint (a nested transaction) journals the entries it changes and restores them when it
  rolls back, as SQLite restores the rows;
- an outer rollback drops the cache; after a commit every entry is clean, and the least recently
  used ones are evicted beyond ``max_bytes``.
Streams (alerts, evidence) are not cached: they are written rarely and read by other threads.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Union, cast

import numpy as np

from gateway.state.base import newest_rows, rows_from_blobs
from gateway.state.bitsets import add_bits, bit_counts, from_blob, is_sparse


class _Rows:
    """A row window: ``data`` float32 [n, dim] (the newest rows), the index after the last, and the
    index after the last row the database holds (``flushed``: later rows are written back)."""

    def __init__(self, dim: int | None, next_seq: int, data: np.ndarray, flushed: int) -> None:
        self.dim, self.next_seq, self.data, self.flushed = dim, next_seq, data, flushed

    def copy(self) -> _Rows:
        return _Rows(self.dim, self.next_seq, self.data, self.flushed)  # data is replaced, never changed in place


Entry = Union[np.ndarray, dict, _Rows, None]  # noqa: UP007 (a runtime alias)  # None: a bitmap absent from the database
_MISSING = object()


class TransactionCache:
    """Entries keyed by (kind, key), kind in ``bits``, ``hash``, ``rows``; see the module docstring."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.version: int | None = None
        self._entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._dirty: dict[tuple[str, str], set[str] | bool] = {}
        self._journals: list[dict[tuple[str, str], tuple[Any, Any]]] = []
        self._bytes = 0  # kept as entries change: summing them per commit would cost O(clients)
        # Per bitmap: (the array they count, segment bits, set bits per segment).
        self._counts: dict[tuple[str, str], tuple[np.ndarray, int, np.ndarray]] = {}

    # ------------------------------------------------------------------ lifecycle
    def begin(self, conn: sqlite3.Connection) -> None:
        """Start of an outer transaction: drop everything if another connection committed."""
        (version,) = conn.execute("PRAGMA data_version").fetchone()
        if version != self.version:
            self.clear()
            self.version = version

    def clear(self) -> None:
        self._entries.clear()
        self._counts.clear()
        self._bytes = 0
        self._dirty.clear()
        self._journals.clear()
        self.version = None

    def savepoint(self) -> None:
        self._journals.append({})

    def release(self) -> None:
        """The savepoint succeeded: its journal folds into the enclosing one (if any)."""
        journal = self._journals.pop()
        if self._journals:
            for slot, before in journal.items():
                self._journals[-1].setdefault(slot, before)

    def rollback_to(self) -> None:
        """The savepoint failed: restore what it changed."""
        for slot, (entry, dirty) in self._journals.pop().items():
            if entry is _MISSING:
                self._remove(slot)
            else:
                self._put(slot, entry)
            if dirty is _MISSING:
                self._dirty.pop(slot, None)
            else:
                self._dirty[slot] = dirty

    def _changing(self, slot: tuple[str, str]) -> None:
        """Journal ``slot``'s value before its first change inside the innermost savepoint."""
        if self._journals and slot not in self._journals[-1]:
            entry = self._entries.get(slot, _MISSING)
            if isinstance(entry, dict):
                entry = dict(entry)
            elif isinstance(entry, _Rows):
                entry = entry.copy()
            dirty = self._dirty.get(slot, _MISSING)
            self._journals[-1][slot] = (entry, set(dirty) if isinstance(dirty, set) else dirty)

    # ------------------------------------------------------------------ loading
    def _get(self, conn: sqlite3.Connection, kind: str, key: str) -> Entry:
        slot = (kind, key)
        if slot in self._entries:
            self._entries.move_to_end(slot)
            return self._entries[slot]
        entry: Entry
        if kind == "bits":
            # Read-only over the blob: set_bits replaces a bitmap, never changes one in place.
            entry = load_bitmap(conn, key)
        elif kind == "hash":
            rows = conn.execute("SELECT field, num, text FROM hashes WHERE key = ?", (key,)).fetchall()
            entry = {name: (text if text is not None else float(num)) for name, num, text in rows}
        else:
            meta = conn.execute("SELECT dim, next_seq FROM row_sets WHERE key = ?", (key,)).fetchone()
            blobs = [b for (b,) in conn.execute("SELECT data FROM rows WHERE key = ? ORDER BY seq", (key,))]
            dim, next_seq = (None, 0) if meta is None else (int(meta[0]), int(meta[1]))
            entry = _Rows(dim, next_seq, rows_from_blobs(blobs, dim or 1, width=dim), flushed=next_seq)
        if self._journals:  # read inside a savepoint: may see its writes, so its rollback forgets it
            self._journals[-1].setdefault(slot, (_MISSING, _MISSING))
        self._put(slot, entry)
        return entry

    def _put(self, slot: tuple[str, str], entry: Entry) -> None:
        self._remove(slot)
        self._entries[slot] = entry
        self._bytes += _size(entry)

    def _remove(self, slot: tuple[str, str]) -> None:
        if slot in self._entries:
            self._bytes -= _size(self._entries.pop(slot))
            self._counts.pop(slot, None)

    # ------------------------------------------------------------------ the store's operations
    def set_bits(self, conn: sqlite3.Connection, key: str, positions: np.ndarray, total_bits: int,
                 segment_bits: int) -> np.ndarray:
        slot = ("bits", key)
        current = self._get(conn, "bits", key)
        known = None if current is None else self._counts.get(slot)
        if current is not None and (known is None or known[0] is not current or known[1] != segment_bits):
            # Loaded (a client not seen lately): count it once, then set bits as for any other.
            known = self._counts[slot] = (current, segment_bits, bit_counts(current, total_bits, segment_bits))
        bits, new = add_bits(current, positions, total_bits)  # type: ignore[arg-type]
        if bits is current:
            return known[2].copy()  # type: ignore[index]
        # Counts kept per bitmap and moved by the newly set bits only: counting all of a 10 KB
        # bitmap's bits on every request would be a large share of the coverage detector's cost.
        counts = np.bincount(new // segment_bits, minlength=total_bits // segment_bits)
        if known is not None:
            counts += known[2]
        self._changing(slot)
        self._put(slot, bits)
        self._counts[slot] = (bits, segment_bits, counts)
        self._dirty[slot] = True
        return counts.copy()

    def bitmap(self, conn: sqlite3.Connection, key: str) -> np.ndarray | None:
        return self._get(conn, "bits", key)  # type: ignore[return-value]

    def incr(self, conn: sqlite3.Connection, key: str, fields: Mapping[str, float]) -> dict[str, float]:
        stored = cast(dict, self._get(conn, "hash", key))
        for name in fields:
            if isinstance(stored.get(name), str):
                raise ValueError(f"field {name!r} of {key!r} holds text, not a number")
        values = {n: float(stored.get(n, 0.0)) + float(a) for n, a in fields.items()}
        self._update(key, stored, values)
        return values

    def set_fields(self, conn: sqlite3.Connection, key: str, fields: Mapping[str, float | str]) -> None:
        stored = cast(dict, self._get(conn, "hash", key))
        self._update(key, stored, fields)  # as field_values made them: str or float

    def _update(self, key: str, stored: dict, values: Mapping[str, Any]) -> None:
        # Only fields whose value changes are written back: most of a request's fields (status,
        # alert flags, figures between tests) stay as they were, and each written field is a
        # B-tree update at commit.
        changed = {k: v for k, v in values.items() if k not in stored or stored[k] != v}
        if changed:
            slot = ("hash", key)
            self._changing(slot)
            added = sum(1 for k in changed if k not in stored)
            stored.update(changed)
            self._bytes += 64 * added
            dirty = self._dirty.get(slot)
            self._dirty[slot] = (dirty if isinstance(dirty, set) else set()) | set(changed)

    def get_fields(self, conn: sqlite3.Connection, key: str) -> dict[str, float | str]:
        return dict(self._get(conn, "hash", key))  # type: ignore[arg-type]

    def push_rows(self, conn: sqlite3.Connection, key: str, rows: np.ndarray, max_rows: int) -> int:
        window = cast(_Rows, self._get(conn, "rows", key))
        if window.dim is not None and window.dim != rows.shape[1]:
            raise ValueError(f"rows for {key!r} have width {window.dim}, got {rows.shape[1]}")
        slot = ("rows", key)
        self._changing(slot)
        kept = newest_rows(None if window.dim is None else window.data, rows, max_rows)
        self._put(slot, _Rows(rows.shape[1], window.next_seq + len(rows), kept, window.flushed))
        self._dirty[slot] = True
        return len(self._entries[slot].data)  # type: ignore[union-attr]

    def get_rows(self, conn: sqlite3.Connection, key: str, dim: int) -> np.ndarray:
        window = cast(_Rows, self._get(conn, "rows", key))
        # Read-only (loaded by frombuffer, grown by newest_rows) and replaced on every change: no copy.
        return np.zeros((0, dim), np.float32) if window.dim is None else window.data

    def drop(self, prefix: str) -> None:
        """Forget the entries of keys starting with ``prefix`` (after :meth:`flush`; being deleted)."""
        for slot in [s for s in self._entries if s[1].startswith(prefix)]:
            self._changing(slot)
            self._remove(slot)
            self._dirty.pop(slot, None)

    # ------------------------------------------------------------------ write-back
    def flush(self, conn: sqlite3.Connection) -> None:
        """Write every changed entry to the database (inside the caller's transaction)."""
        hashes, bitmaps, windows = [], [], []
        for (kind, key), dirty in self._dirty.items():
            entry = self._entries[(kind, key)]
            if kind == "hash":
                hashes += [(key, name, None, value) if isinstance(value, str) else (key, name, value, None)
                           for name, value in ((n, entry[n]) for n in dirty)]  # type: ignore[index,union-attr]
            elif kind == "bits":
                bitmaps.append(bitmap_row(key, entry))  # type: ignore[arg-type]
            else:
                windows.append((key, entry))
        conn.executemany("INSERT INTO hashes (key, field, num, text) VALUES (?, ?, ?, ?) ON CONFLICT (key, field) "
                         "DO UPDATE SET num = excluded.num, text = excluded.text", hashes)
        conn.executemany(UPSERT_BITMAP, bitmaps)
        for key, _ in windows:
            self._changing(("rows", key))  # inside a savepoint: its rollback restores ``flushed``
        _write_windows(conn, windows)
        for _, window in windows:
            window.flushed = window.next_seq
        if not self._journals:
            # Inside a savepoint the entries stay dirty: if it rolls back, SQLite undoes these
            # writes too, and the commit must write them again.
            self._dirty.clear()

    def committed(self) -> None:
        """After COMMIT: every entry is clean; evict the least recently used beyond ``max_bytes``."""
        while self._bytes > self.max_bytes and self._entries:
            slot, entry = self._entries.popitem(last=False)
            self._bytes -= _size(entry)
            self._counts.pop(slot, None)


UPSERT_BITMAP = ("INSERT INTO bitmaps (key, bits, sparse) VALUES (?, ?, ?) "
                 "ON CONFLICT (key) DO UPDATE SET bits = excluded.bits, sparse = excluded.sparse")


def load_bitmap(conn: sqlite3.Connection, key: str) -> np.ndarray | None:
    """``key``'s stored bit set (either form of :mod:`gateway.state.bitsets`), read-only over its
    blob; None when absent."""
    row = conn.execute("SELECT bits, sparse FROM bitmaps WHERE key = ?", (key,)).fetchone()
    return None if row is None else from_blob(row[0], row[1])


def bitmap_row(key: str, bits: np.ndarray) -> tuple[str, bytes, bool]:
    """The parameters of :data:`UPSERT_BITMAP` for ``key``'s set ``bits``."""
    return key, bits.tobytes(), is_sparse(bits)


def _write_windows(conn: sqlite3.Connection, windows: list[tuple[str, _Rows]]) -> None:
    """Append each window's rows the database lacks as one chunk, then drop the rows that slid
    out (whole chunks, and the head of the chunk that straddles the first live row), as
    ``SqliteStore.push_rows`` does: PRADA's 300-row sets are not rewritten whole (77 KB) whenever
    a query joins one."""
    appended, trimmed = [], []
    for key, w in windows:
        first = w.next_seq - len(w.data)
        start = max(w.flushed, first)
        if start < w.next_seq:
            appended.append((key, start, w.data[start - first:].tobytes()))
        trimmed.append((key, 4 * w.dim, first))  # type: ignore[operator]
    conn.executemany("INSERT INTO rows (key, seq, data) VALUES (?, ?, ?) ON CONFLICT (key, seq) "
                     "DO UPDATE SET data = excluded.data", appended)
    trim_windows(conn, trimmed)
    conn.executemany("INSERT INTO row_sets (key, dim, next_seq) VALUES (?, ?, ?) ON CONFLICT (key) "
                     "DO UPDATE SET dim = excluded.dim, next_seq = excluded.next_seq",
                     [(key, w.dim, w.next_seq) for key, w in windows])


def trim_windows(conn: sqlite3.Connection, trims: list[tuple[str, int, int]]) -> None:
    """For each (key, row bytes, cutoff), drop the window's rows with index < cutoff: whole chunks,
    and the head of the chunk that straddles it. ``seq < cutoff`` holds for every chunk to drop or
    cut and bounds the scan of the (key, seq) index to them: without it each trim read every chunk
    of the window (~25 us per request for PRADA's 1,000 one-row distance chunks)."""
    conn.executemany("DELETE FROM rows WHERE key = ? AND seq < ? AND seq + length(data) / ? <= ?",
                     [(key, cutoff, row_bytes, cutoff) for key, row_bytes, cutoff in trims])
    conn.executemany("UPDATE rows SET data = substr(data, (? - seq) * ? + 1), seq = ? WHERE key = ? AND seq < ?",
                     [(cutoff, row_bytes, cutoff, key, cutoff) for key, row_bytes, cutoff in trims])


def _size(entry: Entry) -> int:
    if isinstance(entry, np.ndarray):
        return int(entry.nbytes)
    if isinstance(entry, _Rows):
        return int(entry.data.nbytes) + 64
    if isinstance(entry, dict):
        return 64 * (len(entry) + 1)
    return 64
