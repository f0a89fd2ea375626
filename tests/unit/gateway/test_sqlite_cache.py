"""The SQLite store's write-back transaction cache gives the same answers as plain SQL.

A seeded random sequence of store operations runs on a cached SQLite store (in transactions with
savepoints, some of which fail) and on the memory store (failed savepoints' operations skipped);
every read must agree, and so must a fresh, uncached view of the file at the end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.state.memory import MemoryStore
from gateway.state.sqlite import SqliteStore

TOTAL, SEG = 256, 64
KEYS = [f"m/{client}/{kind}" for client in ("alice", "bob", "carol") for kind in ("a", "b")]


class Fail(Exception):
    """Raised inside a savepoint to roll it back."""


def _plan_operation(rng: np.random.Generator, key: str):
    """One random operation on ``key`` as a function of the store; it returns what it read."""
    kind = int(rng.integers(12))
    if kind == 0:
        positions = rng.integers(0, TOTAL, 3)
        return lambda s: s.set_bits(key + "/bits", positions, TOTAL, SEG).tolist()
    if kind == 1:
        return lambda s: s.count_bits(key + "/bits", TOTAL, SEG).tolist()
    if kind == 2:
        amounts = {f"f{int(rng.integers(3))}": float(rng.integers(1, 5))}
        return lambda s: s.incr(key + "/hash", amounts)
    if kind == 3:
        fields = {"status": str(rng.choice(["ok", "flagged"])), "w": float(rng.random())}
        return lambda s: s.set_fields(key + "/hash", fields)
    if kind == 4:
        return lambda s: s.get_fields(key + "/hash")
    if kind == 5:
        rows = rng.random((int(rng.integers(1, 4)), 2), dtype=np.float32)
        return lambda s: s.push_rows(key + "/rows", rows, 5)
    if kind == 6:
        return lambda s: s.get_rows(key + "/rows", 2).tolist()
    if kind == 7:
        return lambda s: _bitmap_bytes(s, key + "/bits")
    if kind == 8:  # streams are not cached: a failed savepoint must still undo the append
        value = float(rng.random())
        return lambda s: s.append_record(key + "/stream", {"v": value}, max_records=4)
    if kind == 9:
        return lambda s: s.read_records(key + "/stream")
    if kind == 10:
        put = {"status": str(rng.choice(["ok", "flagged"])), "w": float(rng.random())}
        add = {f"f{int(rng.integers(3))}": float(rng.integers(1, 5))}
        return lambda s: s.update_fields(key + "/hash", put, add)
    return lambda s: s.delete(key.rsplit("/", 1)[0] + "/") > 0


def _bitmap_bytes(store, key: str) -> int:
    """The SQLite store's blob size, and for the memory store (which packs every bitmap) the size
    SQLite's would have: 4 bytes per set bit while that is less than the packed form."""
    if isinstance(store, SqliteStore):
        return store.bitmap_bytes(key)
    if not store.bitmap_bytes(key):
        return 0
    return min(4 * int(store.count_bits(key, TOTAL, SEG).sum()), TOTAL // 8)


def _plan(seed: int) -> list[list[tuple[list, bool]]]:
    """30 transactions of 1-5 savepoints (one request each) of 1-6 operations; a quarter fail."""
    rng = np.random.default_rng(seed)
    plan = []
    for _ in range(30):
        savepoints = []
        for _ in range(int(rng.integers(1, 6))):
            key = KEYS[int(rng.integers(len(KEYS)))]
            savepoints.append(([_plan_operation(rng, key) for _ in range(int(rng.integers(1, 7)))],
                               bool(rng.random() < 0.25)))
        plan.append(savepoints)
    return plan


def _run(plan, sqlite: SqliteStore, memory: MemoryStore) -> None:
    for savepoints in plan:
        with sqlite.transaction():
            for operations, fail in savepoints:
                try:
                    with sqlite.transaction():
                        seen = [operation(sqlite) for operation in operations]
                        if fail:
                            raise Fail
                except Fail:
                    continue
                # What the cached store read inside its transaction is what plain dicts give.
                assert seen == [operation(memory) for operation in operations]


def _snapshot(store, keys: list[str]) -> list[object]:
    return [(store.count_bits(k + "/bits", TOTAL, SEG).tolist(), store.get_fields(k + "/hash"),
             store.get_rows(k + "/rows", 2).tolist(), _bitmap_bytes(store, k + "/bits"),
             store.read_records(k + "/stream")) for k in keys]


@pytest.mark.parametrize("seed", range(6))
def test_cached_transactions_match_the_memory_store(tmp_path: Path, seed: int) -> None:
    sqlite, memory = SqliteStore(tmp_path / "s.db", 5000), MemoryStore()
    _run(_plan(seed), sqlite, memory)
    with sqlite.transaction():  # read through the cache
        cached = _snapshot(sqlite, KEYS)
    uncached = SqliteStore(tmp_path / "s.db", 5000, cache_bytes=0)  # what the file holds
    assert cached == _snapshot(memory, KEYS) == _snapshot(uncached, KEYS)
    sqlite.close()
    uncached.close()


def test_reads_inside_a_transaction_see_its_writes_and_other_connections_see_them_after(tmp_path: Path) -> None:
    store, other = SqliteStore(tmp_path / "s.db", 5000), SqliteStore(tmp_path / "s.db", 5000, cache_bytes=0)
    with store.transaction():
        store.incr("m/a/h", {"q": 2})
        store.push_rows("m/a/r", np.ones((2, 3), np.float32), 10)
        assert store.get_fields("m/a/h") == {"q": 2.0}
        assert store.get_rows("m/a/r", 3).shape == (2, 3)
        assert other.get_fields("m/a/h") == {}  # not committed yet
    assert other.get_fields("m/a/h") == {"q": 2.0}
    assert other.get_rows("m/a/r", 3).shape == (2, 3)
    store.close()
    other.close()


def test_a_commit_by_another_connection_invalidates_the_cache(tmp_path: Path) -> None:
    first, second = SqliteStore(tmp_path / "s.db", 5000), SqliteStore(tmp_path / "s.db", 5000)
    with first.transaction():
        first.incr("m/a/h", {"q": 1})
        first.set_bits("m/a/bits", np.array([1]), TOTAL, SEG)
    second.incr("m/a/h", {"q": 10})  # another process on the same file
    second.set_bits("m/a/bits", np.array([200]), TOTAL, SEG)
    with first.transaction():
        assert first.incr("m/a/h", {"q": 1}) == {"q": 12.0}
        assert first.count_bits("m/a/bits", TOTAL, SEG).tolist() == [1, 0, 0, 1]
    assert second.get_fields("m/a/h") == {"q": 12.0}
    first.close()
    second.close()


def test_a_write_outside_a_transaction_on_the_same_thread_is_seen(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", 5000)
    with store.transaction():
        store.incr("m/a/h", {"q": 1})
    store.incr("m/a/h", {"q": 5})  # its own commit, no cache
    with store.transaction():
        assert store.get_fields("m/a/h") == {"q": 6.0}
    store.close()


def test_the_cache_evicts_beyond_its_bound_and_still_answers(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", 5000, cache_bytes=4096)
    for i in range(50):
        with store.transaction():
            store.set_bits(f"m/c{i}/bits", np.array([i]), TOTAL * 8, SEG)  # 256 bytes each
    cache = store._thread_cache()
    assert cache is not None and cache._bytes <= 4096
    with store.transaction():
        assert [int(store.count_bits(f"m/c{i}/bits", TOTAL * 8, SEG).sum()) for i in range(50)] == [1] * 50
    store.close()


def test_bits_set_on_a_bitmap_loaded_from_the_file_count_what_it_held(tmp_path: Path) -> None:
    # A client not seen lately: its bitmap comes from the file, its counts are not cached yet.
    SqliteStore(tmp_path / "s.db", 5000, cache_bytes=0).set_bits("m/a/bits", np.array([1, 200]), TOTAL, SEG)
    store = SqliteStore(tmp_path / "s.db", 5000)
    with store.transaction():
        assert store.set_bits("m/a/bits", np.array([200]), TOTAL, SEG).tolist() == [1, 0, 0, 1]  # no new bit
        assert store.set_bits("m/a/bits", np.array([2, 201]), TOTAL, SEG).tolist() == [2, 0, 0, 2]
    uncached = SqliteStore(tmp_path / "s.db", 5000, cache_bytes=0)
    assert uncached.count_bits("m/a/bits", TOTAL, SEG).tolist() == [2, 0, 0, 2]
    store.close()
    uncached.close()
