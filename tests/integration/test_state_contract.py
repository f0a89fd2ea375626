"""One contract suite for every registered state store, plus what only sqlite or redis promise.

The redis half runs against a real ``redis-server`` (no fakes); each test gets its own key prefix.
"""

from __future__ import annotations

import importlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from contracts.params import ConfigError
from contracts.state import StateStore
from gateway.state.base import STATE_STORES, create_store, packed_with_bits
from gateway.state.sqlite import DEFAULT_CACHE_BYTES, DEFAULT_PAGE_CACHE_BYTES
from tests.servers.procs import REPO, Proc, free_port, start_redis

for _module in ("memory", "sqlite", "redis_store"):  # each registers its store on import
    importlib.import_module(f"gateway.state.{_module}")

TOTAL, SEG = 20 * 4096, 4096  # B4B's coverage bitmap: 20 tables of 4096 buckets
SEGMENTS = TOTAL // SEG


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield proc
    proc.stop()


def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    return create_store("memory", {})


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    return create_store("sqlite", {"path": str(tmp_path / "state" / "moat.db")})


def _redis(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    server: Proc = request.getfixturevalue("redis_server")
    # A fresh prefix per test isolates tests sharing the session's server; two builds in one test
    # share it (tmp_path is per test), as two gateway replicas would.
    return create_store("redis", {"url": server.info["url"], "prefix": f"t-{tmp_path.name}:"})


BUILDERS: dict[str, Callable[[pytest.FixtureRequest, Path], StateStore]] = {
    "memory": _memory, "sqlite": _sqlite, "redis": _redis}


def _build(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    if name not in BUILDERS:
        pytest.fail(f"state store {name!r} is registered but this suite has no fixture for it")
    return BUILDERS[name](request, tmp_path)


@pytest.fixture(params=STATE_STORES.names())
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    built = _build(request.param, request, tmp_path)
    yield built
    built.close()


@pytest.fixture(params=["sqlite", "redis"])
def shared_pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[StateStore, StateStore]]:
    """Two store objects on one backing: two processes on one file, or two replicas on one Redis."""
    first, second = _build(request.param, request, tmp_path), _build(request.param, request, tmp_path)
    yield first, second
    first.close()
    second.close()


def test_every_registered_store_has_a_fixture() -> None:
    assert set(STATE_STORES.names()) == set(BUILDERS)


def test_set_bits_counts_per_segment_and_is_idempotent(store: StateStore) -> None:
    positions = np.array([0, 7, 8, 4095, 4096, 19 * SEG + 5, TOTAL - 1], np.int64)
    expected = np.zeros(SEGMENTS, np.int64)
    expected[[0, 1, 19]] = [4, 1, 2]
    first = store.set_bits("cov/m/alice", positions, TOTAL, SEG)
    assert first.dtype == np.int64 and first.shape == (SEGMENTS,)
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(store.set_bits("cov/m/alice", positions[::-1], TOTAL, SEG), expected)
    np.testing.assert_array_equal(store.count_bits("cov/m/alice", TOTAL, SEG), expected)
    expected[3] += 1
    np.testing.assert_array_equal(store.set_bits("cov/m/alice", np.array([3 * SEG + 9]), TOTAL, SEG), expected)
    np.testing.assert_array_equal(store.count_bits("cov/m/bob", TOTAL, SEG), np.zeros(SEGMENTS, np.int64))


@pytest.mark.parametrize("bad", [-1, TOTAL, TOTAL + 100])
def test_set_bits_rejects_out_of_range_positions_and_changes_nothing(store: StateStore, bad: int) -> None:
    store.set_bits("cov/m/alice", np.array([1]), TOTAL, SEG)
    with pytest.raises(ValueError):
        store.set_bits("cov/m/alice", np.array([2, bad]), TOTAL, SEG)
    assert int(store.count_bits("cov/m/alice", TOTAL, SEG).sum()) == 1


# Bytes of the coverage bitmap with one bit set: packed from the first bit, except in sqlite, which
# keeps a narrow client's few set positions (4 bytes each) until that is no smaller than packed.
ONE_BIT_BYTES = {"memory": TOTAL // 8, "redis": TOTAL // 8, "sqlite": 4}


def test_coverage_bitmap_takes_at_most_10240_bytes_per_client(store: StateStore, request: pytest.FixtureRequest) -> None:
    assert store.bitmap_bytes("cov/m/alice") == 0
    store.set_bits("cov/m/alice", np.array([3]), TOTAL, SEG)
    assert store.bitmap_bytes("cov/m/alice") == ONE_BIT_BYTES[request.node.callspec.params["store"]]
    store.set_bits("cov/m/alice", np.arange(0, TOTAL, 16), TOTAL, SEG)  # 5,120 buckets: a thief's spread
    assert store.bitmap_bytes("cov/m/alice") == TOTAL // 8 == 10240 <= 16 * 1024
    assert int(store.count_bits("cov/m/alice", TOTAL, SEG).sum()) == 5121


def test_hash_fields_keep_numbers_as_float_and_text_as_str(store: StateStore) -> None:
    assert store.get_fields("cnt/m/alice") == {}
    assert store.incr("cnt/m/alice", {"queries": 3, "suspicion": 0.25}) == {"queries": 3.0, "suspicion": 0.25}
    new = store.incr("cnt/m/alice", {"queries": 2})
    assert new == {"queries": 5.0} and isinstance(new["queries"], float)
    store.set_fields("cnt/m/alice", {"status": "blocked", "threshold": 7, "note": "1.5"})
    fields = store.get_fields("cnt/m/alice")
    assert fields == {"queries": 5.0, "suspicion": 0.25, "status": "blocked", "threshold": 7.0, "note": "1.5"}
    assert isinstance(fields["threshold"], float) and isinstance(fields["note"], str)
    store.set_fields("cnt/m/alice", {"status": 2.5, "queries": 0})
    assert store.get_fields("cnt/m/alice")["status"] == 2.5
    assert store.incr("cnt/m/alice", {"queries": -1.5}) == {"queries": -1.5}


def test_update_fields_sets_and_adds_in_one_call(store: StateStore) -> None:
    store.set_fields("cnt/m/alice", {"queries": 2, "status": "ok"})
    added = store.update_fields("cnt/m/alice", {"status": "flagged", "suspicion": 0.5},
                                {"queries": 3, "alerts": 1})
    assert added == {"queries": 5.0, "alerts": 1.0}
    assert store.get_fields("cnt/m/alice") == {"queries": 5.0, "alerts": 1.0, "status": "flagged", "suspicion": 0.5}
    assert store.update_fields("cnt/m/alice", {}, {}) == {}
    assert store.update_fields("cnt/m/bob", {"status": "ok", "level": 2}, {}) == {}
    assert store.get_fields("cnt/m/bob") == {"status": "ok", "level": 2.0}
    assert store.update_fields("cnt/m/carol", {}, {"queries": -1.5}) == {"queries": -1.5}


@pytest.mark.parametrize(("put", "add", "named"), [
    ({"status": "blocked"}, {"status": 1}, "status"),  # set and added to at once
    ({"suspicion": 0.9}, {"queries": 1, "note": 1}, "note"),  # adding to a text field
    ({"suspicion": None}, {"queries": 1}, "suspicion"),  # neither text nor a number
])
def test_update_fields_rejects_bad_input_naming_the_field_and_writes_nothing(
        store: StateStore, put: dict[str, Any], add: dict[str, float], named: str) -> None:
    store.set_fields("cnt/m/alice", {"queries": 2, "note": "x", "status": "ok", "suspicion": 0.1})
    before = store.get_fields("cnt/m/alice")
    with pytest.raises(ValueError, match=repr(named)):
        store.update_fields("cnt/m/alice", put, add)
    assert store.get_fields("cnt/m/alice") == before


def test_push_rows_keeps_the_newest_oldest_first(store: StateStore) -> None:
    empty = store.get_rows("emb/m/alice", 4)
    assert empty.shape == (0, 4) and empty.dtype == np.float32
    first = np.arange(12, dtype=np.float64).reshape(3, 4)  # float64 in: stored as float32
    second = 100 + np.arange(16, dtype=np.float32).reshape(4, 4)
    assert store.push_rows("emb/m/alice", first, max_rows=5) == 3
    assert store.push_rows("emb/m/alice", second, max_rows=5) == 5
    rows = store.get_rows("emb/m/alice", 4)
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, np.concatenate([first, second])[-5:].astype(np.float32))
    with pytest.raises(ValueError):
        store.push_rows("emb/m/alice", np.zeros((1, 3), np.float32), max_rows=5)
    np.testing.assert_array_equal(store.get_rows("emb/m/alice", 4), rows)


def test_rows_pushed_together_come_back_row_by_row(store: StateStore) -> None:
    """Several rows per push (a store may keep them as one chunk) keep their width and order."""
    batches = [np.arange(12, dtype=np.float32).reshape(3, 4) + 100 * i for i in range(4)]
    for count, batch in enumerate(batches, start=1):
        assert store.push_rows("emb/m/bob", batch, max_rows=9) == min(3 * count, 9)
    rows = store.get_rows("emb/m/bob", 4)
    assert rows.shape == (9, 4)
    np.testing.assert_array_equal(rows, np.concatenate(batches)[-9:])
    store.push_rows("emb/m/bob", batches[0][:2], max_rows=4)  # trims inside a pushed batch
    np.testing.assert_array_equal(store.get_rows("emb/m/bob", 4),
                                  np.concatenate([batches[3][-2:], batches[0][:2]]))


def test_records_have_increasing_ids_and_are_trimmed(store: StateStore) -> None:
    assert store.read_records("alerts/m") == []
    ids = [store.append_record("alerts/m", {"i": i, "nested": {"x": [i, "a"]}}) for i in range(6)]
    assert ids == [1, 2, 3, 4, 5, 6]
    assert store.append_record("alerts/other", {"i": 0}) == 1
    assert [i for i, _ in store.read_records("alerts/m", after_id=2, limit=3)] == [3, 4, 5]
    assert store.read_records("alerts/m", after_id=5) == [(6, {"i": 5, "nested": {"x": [5, "a"]}})]
    assert store.read_records("alerts/m", after_id=6) == []
    assert store.append_record("alerts/m", {"i": 6}, max_records=3) == 7
    assert store.read_records("alerts/m") == [(5, {"i": 4, "nested": {"x": [4, "a"]}}),
                                               (6, {"i": 5, "nested": {"x": [5, "a"]}}), (7, {"i": 6})]
    store.append_record("alerts/m", {"i": 6}, max_records=3)  # identical records stay distinct
    assert [r for _, r in store.read_records("alerts/m")][-2:] == [{"i": 6}, {"i": 6}]


def _fill(store: StateStore, key: str) -> None:
    store.set_bits(key, np.array([1]), TOTAL, SEG)
    store.incr(key, {"n": 1})
    store.push_rows(key, np.ones((1, 2), np.float32), 10)
    store.append_record(key, {"k": key})


def _present(store: StateStore, key: str) -> list[bool]:
    return [store.bitmap_bytes(key) > 0, store.get_fields(key) != {},
            len(store.get_rows(key, 2)) > 0, store.read_records(key) != []]


def test_delete_removes_exactly_the_keys_with_the_prefix(store: StateStore) -> None:
    doomed = ["m/alice", "m/alice/ev", "m/alice2"]
    kept = ["m/bob", "m/ali", "x/m/alice", "m/alic*"]
    for key in doomed + kept:
        _fill(store, key)
    assert store.delete("m/alice") == 4 * len(doomed)
    assert all(_present(store, key) == [False] * 4 for key in doomed)
    assert all(_present(store, key) == [True] * 4 for key in kept)
    assert store.delete("m/alice") == 0
    # Ids are never reused, even after the stream is deleted (the memory store's behaviour).
    assert store.append_record("m/alice", {"again": True}) == 2


def test_delete_treats_glob_characters_literally(store: StateStore) -> None:
    for key in ("a*b", "abc", "q?1", "qq1", "[x]1", "x1", "y#h", "y"):
        store.incr(key, {"n": 1})
    assert store.delete("a*") == 1 and store.delete("q?") == 1 and store.delete("[x]") == 1
    assert store.delete("y#") == 1  # "y" must survive: in redis its hash lives at "<prefix>y#h"
    assert [k for k in ("a*b", "abc", "q?1", "qq1", "[x]1", "x1", "y#h", "y") if store.get_fields(k)] == \
        ["abc", "qq1", "x1", "y"]


def _in_threads(work: Callable[[int], Any], threads: int = 8) -> list[Any]:
    """Run ``work(t)`` for t in range(threads) at once (a barrier lines their starts up)."""
    barrier = threading.Barrier(threads)

    def run(t: int) -> Any:
        barrier.wait(timeout=10)
        return work(t)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(run, range(threads)))


def test_concurrent_increments_lose_no_update(store: StateStore) -> None:
    _in_threads(lambda t: [store.incr("cnt/m/alice", {"n": 1, f"t{t}": 1}) for _ in range(250)])
    fields = store.get_fields("cnt/m/alice")
    assert fields.pop("n") == 2000.0
    assert fields == {f"t{t}": 250.0 for t in range(8)}


def test_concurrent_updates_lose_no_increment(store: StateStore) -> None:
    _in_threads(lambda t: [store.update_fields("cnt/m/alice", {f"last{t}": i}, {"n": 1})
                           for i in range(250)])
    fields = store.get_fields("cnt/m/alice")
    assert fields.pop("n") == 2000.0
    assert fields == {f"last{t}": 249.0 for t in range(8)}


def test_concurrent_disjoint_bits_are_all_counted(store: StateStore) -> None:
    # Thread t sets bits t, t+8, t+16, ... one call at a time: every call is a read-modify-write
    # of the same bitmap, so a lost update would leave a bit unset.
    _in_threads(lambda t: [store.set_bits("cov/m/alice", np.array([t + 8 * i]), TOTAL, SEG)
                           for i in range(64)])
    counts = store.count_bits("cov/m/alice", TOTAL, SEG)
    assert counts[0] == 512 and counts.sum() == 512


def test_concurrent_appends_get_distinct_increasing_ids(store: StateStore) -> None:
    got = _in_threads(lambda t: [store.append_record("ev/m", {"t": t, "i": i}) for i in range(50)])
    assert all(ids == sorted(ids) for ids in got)
    assert sorted(i for ids in got for i in ids) == list(range(1, 401))
    records = store.read_records("ev/m", limit=1000)
    assert [i for i, _ in records] == list(range(1, 401))
    assert sorted((r["t"], r["i"]) for _, r in records) == [(t, i) for t in range(8) for i in range(50)]


def test_two_store_objects_on_one_backing_see_each_others_writes(
        shared_pair: tuple[StateStore, StateStore]) -> None:
    first, second = shared_pair
    first.incr("cnt/m/alice", {"n": 2})
    assert second.incr("cnt/m/alice", {"n": 3}) == {"n": 5.0}
    second.set_bits("cov/m/alice", np.array([5]), TOTAL, SEG)
    assert first.set_bits("cov/m/alice", np.array([6]), TOTAL, SEG)[0] == 2
    assert first.append_record("ev/m", {"by": 1}) == 1 and second.append_record("ev/m", {"by": 2}) == 2
    assert [r["by"] for _, r in first.read_records("ev/m")] == [1, 2]


@pytest.mark.parametrize(("name", "params", "field"), [
    ("memory", {"path": "x"}, "state.params.path"),
    ("sqlite", {}, "state.params.path"),
    ("sqlite", {"path": ""}, "state.params.path"),
    ("sqlite", {"path": "{tmp}"}, "state.params.path"),  # a directory, not a file
    ("sqlite", {"path": "{tmp}/a.db", "busy_timeout_ms": -1}, "state.params.busy_timeout_ms"),
    ("sqlite", {"path": "{tmp}/a.db", "busy_timeout_ms": 1.5}, "state.params.busy_timeout_ms"),
    ("sqlite", {"path": "{tmp}/a.db", "journal": "wal"}, "state.params.journal"),
    ("sqlite", {"path": "{tmp}/a.db", "cache_mb": -1}, "state.params.cache_mb"),
    ("sqlite", {"path": "{tmp}/a.db", "page_cache_mb": 0}, "state.params.page_cache_mb"),
    ("sqlite", {"path": "{tmp}/a.db", "page_cache_mb": "64"}, "state.params.page_cache_mb"),
    ("redis", {}, "state.params.url"),
    ("redis", {"url": "http://127.0.0.1:6379"}, "state.params.url"),
    ("redis", {"url": "redis://127.0.0.1:notaport/0"}, "state.params.url"),
    ("redis", {"url": "redis://127.0.0.1:6379", "prefix": ""}, "state.params.prefix"),
    ("redis", {"url": "redis://127.0.0.1:6379", "socket_timeout": 0}, "state.params.socket_timeout"),
    ("redis", {"url": "redis://127.0.0.1:6379", "db": 1}, "state.params.db"),
])
def test_bad_params_name_the_field(name: str, params: dict[str, Any], field: str, tmp_path: Path) -> None:
    params = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in params.items()}
    with pytest.raises(ConfigError) as caught:
        create_store(name, params)
    assert caught.value.field == field


def test_unknown_store_lists_the_valid_names() -> None:
    with pytest.raises(ConfigError) as caught:
        create_store("nope", {})
    assert caught.value.field == "state.name"
    assert all(name in caught.value.problem for name in ("memory", "redis", "sqlite"))


# ---- sqlite only ----------------------------------------------------------------------------

def _sqlite_at(path: Path) -> StateStore:
    return create_store("sqlite", {"path": str(path)})


def test_sqlite_values_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "moat.db"
    store = _sqlite_at(path)
    _fill(store, "m/alice")
    store.set_fields("m/alice", {"status": "blocked"})
    store.close()
    with pytest.raises(RuntimeError):
        store.incr("m/alice", {"n": 1})
    reopened = _sqlite_at(path)
    assert reopened.get_fields("m/alice") == {"n": 1.0, "status": "blocked"}
    assert reopened.count_bits("m/alice", TOTAL, SEG)[0] == 1
    np.testing.assert_array_equal(reopened.get_rows("m/alice", 2), np.ones((1, 2), np.float32))
    assert reopened.read_records("m/alice") == [(1, {"k": "m/alice"})]
    assert reopened.append_record("m/alice", {}) == 2
    reopened.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize(("buckets", "low", "high"), [
    (200, 800, 2 * 1024),  # a narrow client: its set positions, 4 bytes each, with the row's overhead
    (3_000, TOTAL // 8, 16 * 1024),  # a wide one: packed, 10 KB on overflow pages
])
def test_sqlite_coverage_bitmaps_cost_at_most_16_kb_each_on_disk(tmp_path: Path, buckets: int, low: int,
                                                                  high: int) -> None:
    path, clients = tmp_path / "moat.db", 200
    store = _sqlite_at(path)

    def on_disk() -> int:
        with sqlite3.connect(path) as raw:  # fold the WAL into the file so its size is the truth
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return sum(p.stat().st_size for p in tmp_path.glob("moat.db*"))

    before = on_disk()
    rng = np.random.default_rng(0)
    for c in range(clients):
        store.set_bits(f"cov/m/c{c}", rng.choice(TOTAL, buckets, replace=False), TOTAL, SEG)
    per_client = (on_disk() - before) / clients
    assert low <= per_client <= high
    store.close()


def test_sqlite_connections_cache_page_cache_mb_of_pages(tmp_path: Path) -> None:
    store = create_store("sqlite", {"path": str(tmp_path / "a.db"), "page_cache_mb": 8})
    assert store._conn().execute("PRAGMA cache_size").fetchone()[0] == -8 * 1024  # KiB, as SQLite reads it
    store.close()
    default = create_store("sqlite", {"path": str(tmp_path / "b.db")})
    # As large as the write-back cache, so the pages of the clients it holds stay cached too.
    assert default._conn().execute("PRAGMA cache_size").fetchone()[0] == -DEFAULT_PAGE_CACHE_BYTES // 1024
    assert DEFAULT_PAGE_CACHE_BYTES == DEFAULT_CACHE_BYTES
    default.close()


def test_sqlite_reads_a_file_of_packed_bitmaps_written_before_sparse_ones(tmp_path: Path) -> None:
    path = tmp_path / "moat.db"
    with sqlite3.connect(path) as raw:  # the table as earlier versions created it
        raw.execute("CREATE TABLE bitmaps (key TEXT PRIMARY KEY, bits BLOB NOT NULL)")
        raw.execute("INSERT INTO bitmaps VALUES (?, ?)", ("cov/m/old", packed_with_bits(None, [1, 5000], TOTAL).tobytes()))
    store = _sqlite_at(path)
    assert store.count_bits("cov/m/old", TOTAL, SEG)[:2].tolist() == [1, 1]
    assert store.set_bits("cov/m/old", np.array([2]), TOTAL, SEG)[:2].tolist() == [2, 1]
    assert store.bitmap_bytes("cov/m/old") == TOTAL // 8  # packed it was, packed it stays
    store.set_bits("cov/m/new", np.array([7, 4100]), TOTAL, SEG)
    store.close()
    reopened = _sqlite_at(path)
    assert reopened.count_bits("cov/m/new", TOTAL, SEG)[:2].tolist() == [1, 1]
    assert reopened.bitmap_bytes("cov/m/new") == 8
    reopened.close()


def _child(code: str, log: Path, *args: str) -> subprocess.Popen[str]:
    """``python -c code args`` with pipes for stdin and stdout; stderr goes to ``log``."""
    with log.open("w") as errors:
        return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                                env={**os.environ, "PYTHONPATH": str(REPO)})


COUNTING_CHILD = """
import sys
from gateway.state.base import create_store
store = create_store("sqlite", {"path": sys.argv[1]})
while True:
    print(int(store.incr("kill/count", {"n": 1})["n"]), flush=True)
"""


def test_sqlite_keeps_every_acknowledged_increment_across_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "moat.db"
    child = _child(COUNTING_CHILD, tmp_path / "child.log", str(path))
    assert child.stdout is not None
    seen = 0
    for line in child.stdout:  # each printed count was returned by incr, i.e. committed
        seen = int(line)
        if seen >= 300:
            break
    assert seen >= 300, (tmp_path / "child.log").read_text()
    child.send_signal(signal.SIGKILL)  # mid-stream: it is incrementing as fast as it can
    rest = child.stdout.read()  # what the reader had buffered, then the pipe up to EOF
    assert child.wait(timeout=10) == -signal.SIGKILL
    for pipe in (child.stdin, child.stdout):
        if pipe is not None:
            pipe.close()
    acknowledged = [int(line) for line in rest.split("\n")[:-1]] or [seen]  # a cut-off last line is not
    last = acknowledged[-1]
    stored = _sqlite_at(path).get_fields("kill/count")["n"]
    # >= last: what incr returned was committed first. <= last + 1: the child runs one incr at a
    # time, so at most one more commit can have happened before it could print it.
    assert last <= stored <= last + 1


BITS_CHILD = """
import sys
import numpy as np
from gateway.state.base import create_store
store = create_store("sqlite", {"path": sys.argv[1]})
print("ready", flush=True)
sys.stdin.readline()
for p in range(1, 2 * int(sys.argv[2]), 2):
    store.set_bits("xp/bits", np.array([p]), 81920, 4096)
print("done", flush=True)
"""


def test_sqlite_writers_in_two_processes_lose_no_bit(tmp_path: Path) -> None:
    # Only BEGIN IMMEDIATE protects this read-modify-write: the in-process lock does not span processes.
    path, n = tmp_path / "moat.db", 400
    store = _sqlite_at(path)
    child = _child(BITS_CHILD, tmp_path / "child.log", str(path), str(n))
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline() == "ready\n"
    child.stdin.write("go\n")
    child.stdin.flush()
    for p in range(0, 2 * n, 2):
        store.set_bits("xp/bits", np.array([p]), TOTAL, SEG)
    out, _ = child.communicate(timeout=30)
    assert out == "done\n", (tmp_path / "child.log").read_text()
    assert store.count_bits("xp/bits", TOTAL, SEG)[0] == 2 * n
    store.close()


# ---- redis only -----------------------------------------------------------------------------

def test_redis_writes_only_prefixed_keys_in_memory_store_byte_order(redis_server: Proc) -> None:
    url = f"redis://127.0.0.1:{redis_server.info['port']}/5"  # a database no other test uses
    raw = redis.Redis.from_url(url)
    raw.flushdb()
    store = create_store("redis", {"url": url, "prefix": "replica-test:"})
    _fill(store, "m/alice")
    store.set_fields("m/alice", {"status": "x"})
    positions = np.array([0, 3, 9, 4100, TOTAL - 1])
    store.set_bits("m/bits", positions, TOTAL, SEG)
    keys = [k.decode() for k in raw.scan_iter()]
    assert len(keys) == 6 and all(k.startswith("replica-test:") for k in keys)
    # The bytes in Redis are the memory store's packed (little-endian-bit) bitmap.
    assert raw.get("replica-test:m/bits#bm") == packed_with_bits(None, positions, TOTAL).tobytes()
    assert int(raw.memory_usage("replica-test:m/bits#bm")) <= 16 * 1024
    store.close()
    raw.close()


def test_redis_unreachable_raises_connection_error_naming_the_url() -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"  # nothing listens there
    store = create_store("redis", {"url": url, "socket_timeout": 1.0})
    with pytest.raises(ConnectionError) as caught:
        store.incr("cnt/m/alice", {"n": 1})
    assert f"127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}" in str(caught.value)
    assert "secret" not in str(caught.value)
    store.close()


def test_store_declares_how_it_may_be_called_and_its_transaction_keeps_what_it_commits(store: StateStore) -> None:
    """The gateway sequences store calls by what the store declares (gateway/sequencing.py), not by
    probing it: every store says whether it is local and transactional, and offers transaction()."""
    assert isinstance(store, StateStore)
    assert isinstance(store.local, bool) and isinstance(store.transactional, bool)
    with store.transaction():
        store.incr("m/alice/count", {"n": 1})
        store.incr("m/alice/count", {"n": 2})
    assert store.get_fields("m/alice/count") == {"n": 3.0}
    with pytest.raises(RuntimeError), store.transaction():
        store.incr("m/alice/count", {"n": 10})
        raise RuntimeError("a failed request")
    # A transactional store undoes the failed block as a whole; the others kept each call.
    assert store.get_fields("m/alice/count") == {"n": 3.0 if store.transactional else 13.0}
