"""The ``sqlite`` state store: the embedded default, one database file in WAL mode.

Durability: every method is one transaction committed before it returns (or, inside
:meth:`SqliteStore.transaction`, part of one committed when that block ends). With
``journal_mode=WAL`` and ``synchronous=NORMAL`` a commit is in the WAL file (the OS page cache)
when the method returns, so it survives the *process* being killed (``kill -9``, OOM killer,
crash); only an OS crash or power loss can lose the last few commits (never corrupt the file).
That is the right trade for detector state, which a fsync per request would make slow.

Concurrency: each thread gets its own connection (WAL readers never block each other), writes
within the process take one lock (so threads queue in Python instead of spinning in SQLite's
busy handler), and every write transaction starts with ``BEGIN IMMEDIATE``, which takes the
database's write lock *before* reading: a read-modify-write (bitmaps, rows, records) can then
never interleave with a writer in another process on the same file, so no update is lost.
Other processes wait up to ``busy_timeout_ms`` for the lock.

Tables: ``bitmaps(key, bits, sparse)``: the sorted uint32 positions of the set bits while few are
set (``sparse`` = 1), packed little-endian bits as the memory store keeps them after
(:mod:`gateway.state.bitsets`);
``hashes(key, field, num, text)`` one of ``num``/``text`` set; ``row_sets(key, dim, next_seq)``
with ``rows(key, seq, data)``: one chunk per ``push_rows`` call, ``data`` holding its float32 rows
and ``seq`` the index of its first row (a chunk per call rather than a row per row: PRADA reads
thousands of rows per request, and per-SQLite-row overhead made that cost grow with history);
``streams(stream, last_id, live)``
with ``records(stream, id, json)``. A stream's ``last_id`` outlives :meth:`SqliteStore.delete`,
as the memory store's id counter does, so ids are never reused and readers' cursors stay valid.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from contracts.params import ConfigError, ParamError, check_keys, number
from contracts.state import StoreUnavailable
from gateway.state.base import STATE_STORES, field_values, rows_from_blobs
from gateway.state.bitsets import add_bits, bit_counts
from gateway.state.sqlite_cache import (
    UPSERT_BITMAP,
    TransactionCache,
    bitmap_row,
    load_bitmap,
    trim_windows,
)

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
# SQLite's own page cache per connection (its default is 2 MB): the write-back cache flushes each
# commit's changes into the B-tree, whose leaves must be read first, and a leaf not cached is read
# back from the OS, and a recycled page evicts what the next request needs. Sized as the write-back
# cache, so the pages of the clients it holds stay too. Pages are allocated as they are read, up to this;
# with the write-back cache, detection runs on one thread, so one connection grows to it.
DEFAULT_PAGE_CACHE_BYTES = DEFAULT_CACHE_BYTES

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bitmaps (key TEXT PRIMARY KEY, bits BLOB NOT NULL, sparse INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS hashes (key TEXT NOT NULL, field TEXT NOT NULL, num REAL, text TEXT,
                                   PRIMARY KEY (key, field)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS row_sets (key TEXT PRIMARY KEY, dim INTEGER NOT NULL,
                                     next_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rows (key TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
                                 PRIMARY KEY (key, seq));
CREATE TABLE IF NOT EXISTS streams (stream TEXT PRIMARY KEY, last_id INTEGER NOT NULL,
                                    live INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (stream TEXT NOT NULL, id INTEGER NOT NULL, json TEXT NOT NULL,
                                    PRIMARY KEY (stream, id));
"""


def _glob(prefix: str) -> str:
    """A GLOB pattern matching strings that start with ``prefix`` (its wildcards made literal)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in prefix) + "*"


class SqliteStore:
    """The state store in one SQLite file; see the module docstring for durability and locking."""

    # Calls never wait on a network, and with the write-back cache a batch of requests' detection
    # is one short transaction: the event loop may make them (a file shared with another
    # process can make BEGIN wait up to busy_timeout_ms; share state between processes with redis).
    local = True
    transactional = True

    def __init__(self, path: Path, busy_timeout_ms: int, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 page_cache_bytes: int = DEFAULT_PAGE_CACHE_BYTES) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._cache_bytes = cache_bytes
        self._page_cache_kib = max(1, page_cache_bytes // 1024)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        with self._write() as conn:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            if "sparse" not in {column for _, column, *_ in conn.execute("PRAGMA table_info(bitmaps)")}:
                # A file written before sparse bitmaps: every bitmap in it is packed.
                conn.execute("ALTER TABLE bitmaps ADD COLUMN sparse INTEGER NOT NULL DEFAULT 0")

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise RuntimeError(f"the sqlite state store {self.path} is closed")
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (the module's implicit BEGIN is
        # DEFERRED, which would let two writers read the same bitmap). check_same_thread=False
        # only so that close() may close every thread's connection.
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_ms / 1000,
                               isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA cache_size=-{self._page_cache_kib}")  # negative: KiB, not pages
        with self._connections_lock:
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group this thread's calls into one write transaction, committed on exit (so durable
        before the caller goes on) and rolled back as a whole on an exception. The gateway wraps
        each request's protect stage in one: a commit per request instead of one per call, which
        was most of the stage's cost (measured by ``moat bench``). A nested block is a savepoint:
        an exception in it undoes its own writes only, and the outer transaction goes on (the
        detection worker runs a batch of requests in one transaction, each in a savepoint)."""
        if getattr(self._local, "in_transaction", False):
            yield from self._savepoint()
            return
        conn, cache = self._conn(), self._thread_cache()
        try:
            with self._locked(conn):
                self._local.in_transaction = True
                try:
                    if cache is not None:
                        cache.begin(conn)
                        self._local.active_cache = cache
                    yield
                    if cache is not None:
                        cache.flush(conn)
                finally:
                    self._local.in_transaction = False
                    self._local.active_cache = None
        except BaseException:
            if cache is not None:
                cache.clear()  # the database rolled back: the cache no longer matches it
            raise
        if cache is not None:
            cache.committed()

    def _savepoint(self) -> Iterator[None]:
        """A nested transaction. With the cache, SQLite's SAVEPOINT is only issued when the block
        first writes SQL itself (streams, deletes): most blocks only touch cached entries, whose
        journal undoes them, and two statements per request were a tenth of the worker's time."""
        conn, cache = self._conn(), self._thread_cache()
        opened: list[bool] = self._local.__dict__.setdefault("savepoints", [])
        opened.append(False)
        if cache is None:
            self._open_savepoints(conn)
        else:
            cache.savepoint()
        try:
            yield
        except BaseException:
            if opened.pop():
                conn.execute("ROLLBACK TO nested")
                conn.execute("RELEASE nested")
            if cache is not None:
                cache.rollback_to()
            raise
        if opened.pop():
            conn.execute("RELEASE nested")
        if cache is not None:
            cache.release()

    def _open_savepoints(self, conn: sqlite3.Connection) -> None:
        """Issue the SAVEPOINTs of the enclosing blocks not yet issued, outermost first."""
        opened: list[bool] = self._local.__dict__.get("savepoints", [])
        for depth, is_open in enumerate(opened):
            if not is_open:
                conn.execute("SAVEPOINT nested")
                opened[depth] = True

    def _thread_cache(self) -> TransactionCache | None:
        """This thread's write-back cache (transactions only; None when disabled)."""
        if self._cache_bytes <= 0:
            return None
        cache: TransactionCache | None = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = TransactionCache(self._cache_bytes)
        return cache

    def _cached(self) -> TransactionCache | None:
        """The cache to use for this call: inside a transaction only."""
        return getattr(self._local, "active_cache", None)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed on exit, rolled back on an exception; inside
        :meth:`transaction`, part of that one."""
        conn = self._conn()
        if getattr(self._local, "in_transaction", False):
            self._open_savepoints(conn)
            yield conn
            return
        cache = getattr(self._local, "cache", None)
        if cache is not None:
            cache.clear()  # written outside a transaction: the cache cannot know what changed
        with self._locked(conn):
            yield conn

    @contextmanager
    def _locked(self, conn: sqlite3.Connection) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT under the process's write lock; ROLLBACK on an exception. The
        database locked by another process past ``busy_timeout_ms``, a full disk or a read-only
        file raise :class:`StoreUnavailable`, with nothing written."""
        with self._write_lock, _unavailable_on_outage():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def set_bits(self, key: str, positions: np.ndarray, total_bits: int, segment_bits: int) -> np.ndarray:
        """Set bit ``positions`` (int64 [n]); return set bits per segment, int64 [total_bits // segment_bits]."""
        if (cache := self._cached()) is not None:
            return cache.set_bits(self._conn(), key, positions, total_bits, segment_bits)
        with self._write() as conn:
            current = load_bitmap(conn, key)
            bits, _ = add_bits(current, positions, total_bits)
            if bits is not current:
                conn.execute(UPSERT_BITMAP, bitmap_row(key, bits))
        return bit_counts(bits, total_bits, segment_bits)

    def count_bits(self, key: str, total_bits: int, segment_bits: int) -> np.ndarray:
        """Set bits per segment, int64 [total_bits // segment_bits]; zeros when absent."""
        if (cache := self._cached()) is not None:
            bits = cache.bitmap(self._conn(), key)
        else:
            bits = load_bitmap(self._conn(), key)
        if bits is None:
            return np.zeros(total_bits // segment_bits, np.int64)
        return bit_counts(bits, total_bits, segment_bits)

    def bitmap_bytes(self, key: str) -> int:
        """Bytes of the bitmap's blob (0 when absent): 4 per set bit while few are set, else the
        packed bits (see :mod:`gateway.state.bitsets`); the file adds SQLite's page overhead."""
        if (cache := self._cached()) is not None:
            bits = cache.bitmap(self._conn(), key)
            return 0 if bits is None else int(bits.nbytes)
        row = self._conn().execute("SELECT length(bits) FROM bitmaps WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def incr(self, key: str, fields: Mapping[str, float]) -> dict[str, float]:
        """Add each amount to its numeric field (absent = 0); return the new values."""
        if (cache := self._cached()) is not None:
            return cache.incr(self._conn(), key, fields)
        out: dict[str, float] = {}
        with self._write() as conn:
            for name, amount in fields.items():
                # The WHERE makes a text field yield no row instead of silently becoming a number.
                row = conn.execute(
                    "INSERT INTO hashes (key, field, num) VALUES (?, ?, ?) ON CONFLICT (key, field) "
                    "DO UPDATE SET num = coalesce(num, 0) + excluded.num WHERE text IS NULL RETURNING num",
                    (key, name, float(amount))).fetchone()
                if row is None:
                    raise ValueError(f"field {name!r} of {key!r} holds text, not a number")
                out[name] = float(row[0])
        return out

    def set_fields(self, key: str, fields: Mapping[str, float | str]) -> None:
        """Overwrite fields; ``str`` values are stored as text, anything else as a float."""
        fields = field_values(key, fields)
        if (cache := self._cached()) is not None:
            cache.set_fields(self._conn(), key, fields)
            return
        values = [(key, name, None, value) if isinstance(value, str) else (key, name, value, None)
                  for name, value in fields.items()]
        with self._write() as conn:
            conn.executemany("INSERT INTO hashes (key, field, num, text) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (key, field) DO UPDATE SET num = excluded.num, text = excluded.text",
                             values)

    def update_fields(self, key: str, put: Mapping[str, float | str], add: Mapping[str, float]) -> dict[str, float]:
        """:meth:`set_fields` of ``put`` and :meth:`incr` of ``add`` in one transaction (a savepoint
        inside one): nothing written when either raises."""
        values = field_values(key, put, add)
        if (cache := self._cached()) is not None:
            conn = self._conn()
            added = cache.incr(conn, key, add)  # checks every field before it changes one
            cache.set_fields(conn, key, values)  # checked already: cannot fail
            return added
        with self.transaction():
            added = self.incr(key, add)
            self.set_fields(key, values)
        return added

    def get_fields(self, key: str) -> dict[str, float | str]:
        """All fields: numbers as float, text as str; empty when absent."""
        if (cache := self._cached()) is not None:
            return cache.get_fields(self._conn(), key)
        rows = self._conn().execute("SELECT field, num, text FROM hashes WHERE key = ?", (key,)).fetchall()
        return {name: (text if text is not None else float(num)) for name, num, text in rows}

    def push_rows(self, key: str, rows: np.ndarray, max_rows: int) -> int:
        """Append float32 rows [n, d] (d fixed per key); keep the newest ``max_rows``; return the count."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] < 1:
            raise ValueError(f"rows must be 2-D [n, d] with d >= 1, got shape {rows.shape}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if (cache := self._cached()) is not None:
            return cache.push_rows(self._conn(), key, rows, max_rows)
        with self._write() as conn:
            meta = conn.execute("SELECT dim, next_seq FROM row_sets WHERE key = ?", (key,)).fetchone()
            dim, start = (rows.shape[1], 0) if meta is None else meta
            if dim != rows.shape[1]:
                raise ValueError(f"rows for {key!r} have width {dim}, got {rows.shape[1]}")
            end = start + len(rows)
            if len(rows):
                conn.execute("INSERT INTO rows (key, seq, data) VALUES (?, ?, ?)", (key, start, rows.tobytes()))
            conn.execute("INSERT INTO row_sets (key, dim, next_seq) VALUES (?, ?, ?) "
                         "ON CONFLICT (key) DO UPDATE SET next_seq = excluded.next_seq", (key, dim, end))
            trim_windows(conn, [(key, 4 * dim, end - max_rows)])
            (stored,) = conn.execute("SELECT coalesce(sum(length(data)), 0) FROM rows WHERE key = ?",
                                     (key,)).fetchone()
            return int(stored) // (4 * dim)

    def get_rows(self, key: str, dim: int) -> np.ndarray:
        """The stored rows, float32 [n, dim], oldest first; [0, dim] when absent."""
        if (cache := self._cached()) is not None:
            return cache.get_rows(self._conn(), key, dim)
        conn = self._conn()
        meta = conn.execute("SELECT dim FROM row_sets WHERE key = ?", (key,)).fetchone()
        blobs = [b for (b,) in conn.execute("SELECT data FROM rows WHERE key = ? ORDER BY seq", (key,))]
        return rows_from_blobs(blobs, dim, width=None if meta is None else int(meta[0]))

    def append_record(self, stream: str, record: Mapping[str, Any], max_records: int | None = None) -> int:
        """Append a JSON record; return its id (increasing per stream, from 1, never reused)."""
        text = json.dumps(record)
        if max_records is not None and max_records < 0:
            raise ValueError(f"max_records must be >= 0, got {max_records}")
        with self._write() as conn:
            (record_id,) = conn.execute(
                "INSERT INTO streams (stream, last_id, live) VALUES (?, 1, 1) ON CONFLICT (stream) "
                "DO UPDATE SET last_id = last_id + 1, live = 1 RETURNING last_id", (stream,)).fetchone()
            conn.execute("INSERT INTO records (stream, id, json) VALUES (?, ?, ?)", (stream, record_id, text))
            if max_records is not None:
                # Ids of a stream's live records are consecutive, so trimming by id trims by count.
                conn.execute("DELETE FROM records WHERE stream = ? AND id <= ?",
                             (stream, record_id - max_records))
        return int(record_id)

    def read_records(self, stream: str, after_id: int = 0, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        """Records with id > ``after_id``, oldest first, at most ``limit``."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        rows = self._conn().execute(
            "SELECT id, json FROM records WHERE stream = ? AND id > ? ORDER BY id LIMIT ?",
            (stream, int(after_id), int(limit))).fetchall()
        return [(int(i), json.loads(text)) for i, text in rows]

    def delete(self, prefix: str) -> int:
        """Delete every key and stream starting with ``prefix``; return how many (key, kind) went."""
        pattern = _glob(prefix)
        if (cache := self._cached()) is not None:
            self._open_savepoints(self._conn())
            cache.flush(self._conn())  # so that the count below includes keys created in this transaction
            cache.drop(prefix)
        with self._write() as conn:
            removed = conn.execute("DELETE FROM bitmaps WHERE key GLOB ?", (pattern,)).rowcount
            removed += conn.execute("SELECT count(DISTINCT key) FROM hashes WHERE key GLOB ?",
                                    (pattern,)).fetchone()[0]
            conn.execute("DELETE FROM hashes WHERE key GLOB ?", (pattern,))
            removed += conn.execute("DELETE FROM row_sets WHERE key GLOB ?", (pattern,)).rowcount
            conn.execute("DELETE FROM rows WHERE key GLOB ?", (pattern,))
            # Streams keep their id counter (live = 0), so a re-created stream never reuses an id.
            removed += conn.execute("UPDATE streams SET live = 0 WHERE live = 1 AND stream GLOB ?",
                                    (pattern,)).rowcount
            conn.execute("DELETE FROM records WHERE stream GLOB ?", (pattern,))
        return int(removed)

    def close(self) -> None:
        """Close every thread's connection; the store must not be used afterwards."""
        self._closed = True
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()


# What SQLite says when the file, not the query, is the problem: another process holds the lock,
# or the disk cannot take the write.
_OUTAGES = ("locked", "busy", "disk", "readonly", "read-only", "i/o error")


@contextmanager
def _unavailable_on_outage() -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as error:
        if any(word in str(error).lower() for word in _OUTAGES):
            raise StoreUnavailable(f"sqlite: {error}") from error
        raise


@STATE_STORES.register("sqlite")
def create_sqlite(params: Mapping[str, Any], where: str) -> SqliteStore:
    """``path`` (required; parent directories are created), ``busy_timeout_ms`` (default 5000) and
    ``cache_mb``, the write-back cache of detection's transactions (default 256; 0 turns it off), and
    ``page_cache_mb``, SQLite's page cache per connection (default 256)."""
    try:
        check_keys(params, ("path", "busy_timeout_ms", "cache_mb", "page_cache_mb"), required=("path",))
        busy_timeout_ms = number(params, "busy_timeout_ms", 5000, low=0, high=600_000, integer=True)
        cache_mb = number(params, "cache_mb", DEFAULT_CACHE_BYTES // 2**20, low=0, high=1 << 20)
        page_cache_mb = number(params, "page_cache_mb", DEFAULT_PAGE_CACHE_BYTES // 2**20, low=1, high=1 << 20)
        raw_path = params["path"]
        if not isinstance(raw_path, (str, Path)) or not str(raw_path).strip():
            raise ParamError("path", f"must be a non-empty file path, got {raw_path!r}")
        path = Path(raw_path).expanduser()
        if path.is_dir():
            raise ParamError("path", f"{path} is a directory; give the database file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return SqliteStore(path, busy_timeout_ms, int(cache_mb * 2**20), int(page_cache_mb * 2**20))
        except (OSError, sqlite3.Error) as exc:
            raise ParamError("path", f"cannot open {path}: {exc}") from exc
    except ParamError as exc:
        raise ConfigError(f"{where}.{exc.param}", exc.problem) from exc
