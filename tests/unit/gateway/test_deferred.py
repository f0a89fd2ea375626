"""DetectionWorker and LoopDetection: per-client order, waiting for a client's queued work, failures reported once."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from gateway.deferred import DetectionWorker
from gateway.state.base import create_store


def test_jobs_of_one_client_run_in_order_and_settled_waits_for_them() -> None:
    async def scenario() -> None:
        worker = DetectionWorker(shards=3)
        seen: list[tuple[str, int]] = []
        gate = threading.Event()
        worker.submit("alice", gate.wait)  # holds alice's shard until released
        for i in range(20):
            for client in ("alice", "bob"):
                worker.submit(client, lambda c=client, i=i: seen.append((c, i)))
        waiting = asyncio.ensure_future(worker.settled("alice"))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # alice's jobs are stuck behind the gate
        gate.set()
        await waiting
        assert [i for c, i in seen if c == "alice"] == list(range(20))
        await worker.settled("bob")
        assert [i for c, i in seen if c == "bob"] == list(range(20))
        await worker.settled("carol")  # nothing queued: returns at once
        worker.close()

    asyncio.run(scenario())


def test_a_failed_job_is_raised_to_the_clients_next_request_once() -> None:
    async def scenario() -> None:
        worker = DetectionWorker(shards=1)

        def fail() -> None:
            raise ConnectionError("store went away")

        worker.submit("alice", fail)
        worker.submit("bob", lambda: None)
        with pytest.raises(ConnectionError, match="store went away"):
            await worker.settled("alice")
        await worker.settled("alice")  # reported once
        await worker.settled("bob")  # other clients are unaffected
        with pytest.raises(ValueError, match="bad"):
            await worker.call("bob", lambda: (_ for _ in ()).throw(ValueError("bad")))
        assert await worker.call("bob", lambda: 41 + 1) == 42
        worker.close()

    asyncio.run(scenario())


def test_a_batch_commits_once_and_a_failing_job_undoes_only_its_writes(tmp_path: Path) -> None:
    store = create_store("sqlite", {"path": str(tmp_path / "s.db")})
    worker = DetectionWorker(shards=1, transaction=store.transaction)  # type: ignore[attr-defined]

    def broken() -> None:
        store.incr("m/bob/status", {"queries": 1})
        raise RuntimeError("a bug in one request's detection")

    async def scenario() -> None:
        gate = threading.Event()
        worker.submit("x", gate.wait)  # the jobs below queue up and run as one batch
        for _ in range(5):
            worker.submit("alice", lambda: store.incr("m/alice/status", {"queries": 1}))
        worker.submit("bob", broken)
        worker.submit("carol", lambda: store.set_bits("m/carol/cov", np.array([1]), 16, 8))
        gate.set()
        await worker.drain()
        with pytest.raises(RuntimeError):
            await worker.settled("bob")

    asyncio.run(scenario())
    assert store.get_fields("m/alice/status") == {"queries": 5.0}
    assert store.get_fields("m/bob/status") == {}
    assert list(store.count_bits("m/carol/cov", 16, 8)) == [1, 0]
    worker.close()
    store.close()


def test_close_runs_what_is_queued() -> None:
    worker = DetectionWorker(shards=2)
    done: list[int] = []
    for i in range(50):
        worker.submit(f"client-{i % 7}", lambda i=i: done.append(i))
    worker.close()
    assert sorted(done) == list(range(50))


def test_shards_must_be_positive() -> None:
    with pytest.raises(ValueError, match="shards must be >= 1, got 0"):
        DetectionWorker(shards=0)


def test_a_job_submitted_alone_runs_on_the_loops_next_turn_with_the_gathered_ones_first() -> None:
    """A request alone in flight is detected as soon as its answer is on its way (the loop's next
    turn), not after the gathering delay; jobs gathered before it run first, in order."""
    from gateway.deferred import BATCH_SECONDS, LoopDetection

    async def scenario() -> None:
        detection = LoopDetection()
        seen: list[str] = []
        detection.submit("alice", lambda: seen.append("alice"))  # under load: gathered
        detection.submit("bob", lambda: seen.append("bob"), soon=True)
        assert seen == []  # not inline: the answer is handed to gRPC first
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(0)
        assert seen == ["alice", "bob"] and not detection.pending
        assert asyncio.get_running_loop().time() - started < BATCH_SECONDS
        await asyncio.sleep(2 * BATCH_SECONDS)  # the gathering timer was replaced, not left to fire
        assert seen == ["alice", "bob"]
        detection.close()

    asyncio.run(scenario())


def test_loop_detection_runs_in_order_when_the_loop_is_free_and_reports_failures_once() -> None:
    from gateway.deferred import BATCH_SECONDS, LoopDetection

    async def scenario() -> None:
        detection = LoopDetection()
        seen: list[tuple[str, int]] = []
        for i in range(3):
            detection.submit("alice", lambda i=i: seen.append(("alice", i)))
        await asyncio.sleep(0)
        assert seen == [] and detection.pending  # not in the answer's way: gathered...
        detection.run_queued()  # ...until the next request waits for its model
        assert seen == [("alice", 0), ("alice", 1), ("alice", 2)] and not detection.pending

        detection.submit("bob", lambda: (_ for _ in ()).throw(ConnectionError("store went away")))
        detection.submit("carol", lambda: seen.append(("carol", 0)))
        detection.settle("carol")  # carol's next request runs the queue now
        assert seen[-1] == ("carol", 0) and not detection.pending
        with pytest.raises(ConnectionError, match="store went away"):
            detection.settle("bob")
        detection.settle("bob")  # reported once

        detection.submit("dave", lambda: seen.append(("dave", 0)))
        await asyncio.sleep(2 * BATCH_SECONDS)  # no request came: the timer ran them
        assert seen[-1] == ("dave", 0) and not detection.pending
        detection.close()

    asyncio.run(scenario())


def test_loop_call_runs_after_the_clients_jobs_and_keeps_the_loops_cache(tmp_path: Path) -> None:
    """Evidence written with LoopDetection.call is committed when it returns, comes after the
    client's queued detection, and (being the loop's own connection) leaves its write-back cache
    valid, where a commit by another thread's connection makes the next batch reload from SQL."""
    from gateway.deferred import LoopDetection

    store = create_store("sqlite", {"path": str(tmp_path / "s.db")})
    statements: list[str] = []

    async def scenario() -> None:
        detection = LoopDetection(store.transaction)  # type: ignore[attr-defined]
        store._conn().set_trace_callback(statements.append)  # type: ignore[attr-defined]  # this thread's
        detection.submit("alice", lambda: store.incr("m/alice/status", {"queries": 1}))
        record = detection.call("alice", lambda: (store.get_fields("m/alice/status"),
                                                  store.append_record("m/alice/evidence", {"n": 1})))
        assert record == ({"queries": 1.0}, 1)  # alice's queued job ran first
        reads: list[object] = []
        other = threading.Thread(target=lambda: reads.append(store.read_records("m/alice/evidence")))
        other.start()
        other.join()
        assert reads == [[(1, {"n": 1})]]  # committed, visible to another connection

        statements.clear()
        detection.submit("alice", lambda: store.incr("m/alice/status", {"queries": 1}))
        detection.run()
        assert not any(s.startswith("SELECT") and "hashes" in s for s in statements)  # still cached

        writer = threading.Thread(target=lambda: store.append_record("m/bob/evidence", {"n": 1}))
        writer.start()
        writer.join()
        statements.clear()
        detection.submit("alice", lambda: store.incr("m/alice/status", {"queries": 1}))
        detection.run()
        assert any(s.startswith("SELECT") and "hashes" in s for s in statements)  # dropped, reloaded
        assert store.get_fields("m/alice/status") == {"queries": 3.0}

    asyncio.run(scenario())
    store.close()


def _queries_seen_by_another_connection(store: object, key: str) -> float:
    """``key``'s ``queries`` as a fresh thread (its own connection) reads it: committed state only."""
    seen: list[float] = []
    reader = threading.Thread(target=lambda: seen.append(float(store.get_fields(key).get("queries", 0))))  # type: ignore[attr-defined]
    reader.start()
    reader.join()
    return seen[0]


def test_loop_detection_commits_its_jobs_together_within_commit_seconds(tmp_path: Path) -> None:
    """Group commit: jobs of several loop iterations run at once, on the loop's connection, and
    are committed together when ``commit_seconds`` have passed; call() and run() commit at once."""
    from gateway.deferred import LoopDetection

    store = create_store("sqlite", {"path": str(tmp_path / "s.db")})
    commits: list[str] = []

    async def scenario() -> None:
        detection = LoopDetection(store.transaction, commit_seconds=0.2)  # type: ignore[attr-defined]
        store._conn().set_trace_callback(lambda s: commits.append(s) if s == "COMMIT" else None)  # type: ignore[attr-defined]
        for _ in range(3):
            detection.submit("alice", lambda: store.incr("m/alice/status", {"queries": 1}))
            detection.run_queued()  # each job runs on its own (as each next request waits)...
            await asyncio.sleep(0)
        assert store.get_fields("m/alice/status") == {"queries": 3.0}  # ...visible on the loop's connection
        assert _queries_seen_by_another_connection(store, "m/alice/status") == 0.0 and commits == []
        await asyncio.sleep(0.3)
        assert _queries_seen_by_another_connection(store, "m/alice/status") == 3.0 and commits == ["COMMIT"]

        detection.submit("alice", lambda: store.incr("m/alice/status", {"queries": 1}))
        assert detection.call("alice", lambda: store.append_record("m/alice/evidence", {"n": 1})) == 1
        assert _queries_seen_by_another_connection(store, "m/alice/status") == 4.0  # committed with the evidence
        detection.submit("alice", lambda: store.incr("m/alice/status", {"queries": 1}))
        detection.run()  # an admin read: run and committed now
        assert _queries_seen_by_another_connection(store, "m/alice/status") == 5.0 and len(commits) == 3
        detection.close()

    asyncio.run(scenario())
    store.close()


def test_a_failed_group_commit_is_reported_to_each_of_its_clients_once() -> None:
    from contextlib import contextmanager

    from gateway.deferred import LoopDetection

    depth = [0]

    @contextmanager
    def transaction_whose_commit_fails():  # type: ignore[no-untyped-def]
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            raise OSError("disk I/O error")

    async def scenario() -> None:
        detection = LoopDetection(transaction_whose_commit_fails, commit_seconds=0.05)
        ran: list[str] = []
        for client in ("alice", "bob"):
            detection.submit(client, lambda c=client: ran.append(c))
        await asyncio.sleep(0.1)  # ran, then the timer's commit failed
        assert ran == ["alice", "bob"]
        for client in ("alice", "bob"):
            with pytest.raises(OSError, match="disk I/O error"):
                detection.settle(client)
            detection.settle(client)  # reported once
        with pytest.raises(ValueError, match="commit_seconds must be >= 0, got -1"):
            LoopDetection(commit_seconds=-1)

    asyncio.run(scenario())
