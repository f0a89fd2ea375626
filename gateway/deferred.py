"""Deferred detection: a small request is answered first and detected after it, in order.

The gateway answers a request of at most ``server.deferred_max_rows`` rows with the defenses its
client's standing called for *before* it (the state all its earlier requests left), then records
the request's own detection after the answer has left: detection no longer sits on the request's
latency (``moat bench``: the protect stage, ~0.3–0.5 ms of Python and ~25 store statements, plus
two thread-pool hops, was most of what full protection added). Ordering keeps the result what
inline detection would give one request later, deterministically:

- jobs of one client run in submission order;
- before a request's defenses, the client's queued jobs have run (:meth:`LoopDetection.settle`,
  :meth:`DetectionWorker.settled`), so its answer reflects every earlier request;
- queued jobs run a batch per store transaction, each in a savepoint: one commit per batch (on
  the loop, one per ``server.detection_commit_ms``: group commit).

Two runners. :class:`LoopDetection` runs jobs on the event loop's thread, for stores whose calls
never wait on a network (memory; sqlite with its write-back cache): no second thread contends for
the GIL, and a job runs as soon as its answer is on its way when that request was the only one in
flight (while the client reads it and sends its next), gathered with others under load, or
while the next request waits for its model if one is still queued then (``DataPlane._while_waiting``). :class:`DetectionWorker` runs them on
threads (sharded by client), for redis, whose round trips must stay off the loop; it also runs
store calls that must finish before an answer leaves (big batches judged inline; first look-ups
of a client and evidence too, on redis: on local stores :meth:`LoopDetection.call` runs them on
the loop).

A job that fails is logged and reported to the client's next request (UNAVAILABLE when the store
failed), so a store outage still reaches clients instead of silently skipping detection. What a
``kill -9`` can lose: the detection of answers sent in the last few milliseconds (on the worker,
at most one request per client: its next request waits for it; on the loop, those of the last
``detection_commit_ms``); watermark evidence is always committed before its answer leaves.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ContextManager, TypeVar, cast

T = TypeVar("T")
log = logging.getLogger("moat.detection")
MAX_BATCH_JOBS = 64  # jobs per transaction: bounds how long a commit can be delayed
BATCH_SECONDS = 0.003  # while other requests are in flight, loop detection gathers jobs this long


@dataclass
class _Job:
    client: str
    function: Callable[[], Any]
    future: asyncio.Future[Any] | None = None
    result: Any = None
    error: BaseException | None = None


@dataclass
class _ClientQueue:
    """Jobs of one client not yet run, the futures waiting for them to finish, its last failure."""

    pending: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    failure: BaseException | None = None


class DetectionWorker:
    """``shards`` threads, each running its clients' jobs in order (see the module docstring).

    ``transaction`` is the state store's transaction factory (``SqliteStore.transaction``); with
    ``nullcontext`` every store call commits on its own (memory, Redis).
    """

    def __init__(self, shards: int, transaction: Callable[[], ContextManager[Any]] = nullcontext,
                 thread_init: Callable[[], None] = lambda: None) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        self._transaction = transaction
        self._thread_init = thread_init
        self._lock = threading.Lock()
        self._clients: dict[str, _ClientQueue] = {}
        self._queues: list[queue.SimpleQueue[_Job | None]] = [queue.SimpleQueue() for _ in range(shards)]
        self._threads = [threading.Thread(target=self._serve, args=(q,), name=f"detect-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for thread in self._threads:
            thread.start()

    def _enqueue(self, job: _Job) -> None:
        with self._lock:
            self._clients.setdefault(job.client, _ClientQueue()).pending += 1
        self._queues[zlib.crc32(job.client.encode()) % len(self._queues)].put(job)

    def submit(self, client: str, function: Callable[[], Any]) -> None:
        """Run ``function`` after ``client``'s earlier jobs; nobody waits for it."""
        self._enqueue(_Job(client, function))

    async def call(self, client: str, function: Callable[[], T]) -> T:
        """Run ``function`` after ``client``'s earlier jobs (committed before this returns); its result."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(client, function, future))
        return await future

    async def settled(self, client: str) -> None:
        """Wait until every job submitted for ``client`` has run; raise the failure of a job that
        nobody waited for (once), so the client's next request reports it."""
        with self._lock:
            state = self._clients.get(client)
            if state is None:
                return
            waiter = None
            if state.pending:
                waiter = asyncio.get_running_loop().create_future()
                state.waiters.append(waiter)
        if waiter is not None:
            await waiter
        with self._lock:
            failure, state.failure = state.failure, None
        if failure is not None:
            raise failure

    async def drain(self) -> None:
        """Wait until every job submitted so far, of every client, has run."""
        loop = asyncio.get_running_loop()
        markers = [loop.create_future() for _ in self._queues]
        for marker, shard in zip(markers, self._queues, strict=True):
            shard.put(_Job("", lambda: None, marker))
        await asyncio.gather(*markers)

    def close(self) -> None:
        """Run what is queued, then stop the threads (the process is shutting down)."""
        for shard in self._queues:
            shard.put(None)
        for thread in self._threads:
            thread.join()

    # ------------------------------------------------------------------ worker threads
    def _serve(self, shard: queue.SimpleQueue[_Job | None]) -> None:
        self._thread_init()
        while True:
            job = shard.get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < MAX_BATCH_JOBS:
                try:
                    job = shard.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    shard.put(None)  # stop after this batch
                    break
                jobs.append(job)
            self._run_batch(jobs)

    def _run_batch(self, jobs: list[_Job]) -> None:
        _run_jobs(self._transaction, jobs)
        for job in jobs:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        if job.future is not None:
            future = job.future
            future.get_loop().call_soon_threadsafe(_resolve, future, job.result, job.error)
        elif job.error is not None:
            log.error("detection failed for client %s", job.client, exc_info=job.error)
        if not job.client:
            return
        with self._lock:
            state = self._clients[job.client]
            state.pending -= 1
            if job.error is not None and job.future is None:
                state.failure = job.error
            waiters = state.waiters if state.pending == 0 else []
            if waiters:
                state.waiters = []
            elif state.pending == 0 and state.failure is None:
                del self._clients[job.client]  # bounded by the clients with work in flight
        for waiter in waiters:
            waiter.get_loop().call_soon_threadsafe(_resolve, waiter, None, None)


def _run_jobs(transaction: Callable[[], ContextManager[Any]], jobs: list[_Job]) -> None:
    """Run ``jobs`` in order in one transaction (see :func:`_run_each`); a failed commit is every
    job's error."""
    try:
        with transaction():
            _run_each(transaction, jobs)
    except Exception as error:  # noqa: BLE001 (the commit failed: no job's writes are stored)
        for job in jobs:
            job.error = job.error or error


def _run_each(transaction: Callable[[], ContextManager[Any]], jobs: list[_Job]) -> None:
    """Run ``jobs`` in order inside an open transaction, each in a savepoint, so a failing job
    undoes only its own writes; each job's result or error is left on it."""
    for job in jobs:
        try:
            with transaction():
                job.result = job.function()
        except Exception as error:  # noqa: BLE001 (reported to the client; never stops the runner)
            job.error = error


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the waiting request was cancelled (deadline, client gone)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class LoopDetection:
    """Deferred detection on the event loop's own thread, for stores whose calls never wait on a
    network (memory, sqlite with its write-back cache): queued jobs run once the answer that
    queued them is on its way, while the loop would otherwise idle: during the next request's
    wait for its model, or gathered for a few milliseconds under load (see :meth:`submit`). No
    second thread competes for the GIL (``moat bench``: with the detection thread, requests at
    concurrency 1 spent ~0.35 ms more in the gateway, waiting for the GIL, than the detection
    itself took); and at concurrency 1 the next request no longer queues behind the detection
    (run right after each answer, it held the loop when the client's next request came: the
    classifier's p50 went from 1.37x to 1.26x the bare proxy's in one interleaved run).

    Jobs run in submission order, each in a savepoint of one store transaction that stays open
    up to ``commit_seconds`` (group commit; 0: committed after each batch): the write-back cache
    is flushed and the transaction committed once for every job of that span instead of once per
    job (``moat bench``, classifier at concurrency 1: 2.8 -> 2.5 ms of gateway CPU per request at
    20 ms; 50 ms, the default, saved ~0.05 ms more). A ``kill -9`` loses the detection of at most
    that span's answers; :meth:`call` with ``commit`` (evidence), :meth:`run` (admin reads,
    shutdown) and :meth:`commit` commit at once.
    While the transaction is open this thread holds the store's write lock, so writes from other
    threads wait for the commit: the data plane commits before it hands work to the worker.
    A failure is kept for the client's next request, as :class:`DetectionWorker` does.
    """

    def __init__(self, transaction: Callable[[], ContextManager[Any]] = nullcontext,
                 commit_seconds: float = 0.0) -> None:
        if commit_seconds < 0:
            raise ValueError(f"commit_seconds must be >= 0, got {commit_seconds}")
        self._transaction = transaction
        self._commit_seconds = commit_seconds
        self._jobs: list[_Job] = []
        self._pending: dict[str, int] = {}
        self._failures: dict[str, BaseException] = {}
        self._timer: asyncio.Handle | None = None
        self._open: ContextManager[Any] | None = None  # the transaction run jobs are in, not committed
        self._uncommitted: list[_Job] = []
        self._commit_timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> bool:
        return bool(self._jobs)

    def submit(self, client: str, function: Callable[[], Any], *, soon: bool = False) -> None:
        """Queue ``function`` (call on the loop; its request's answer is about to be handed to gRPC).

        ``soon`` (the request was the only one in flight): the queue runs on the loop's next turn,
        once gRPC has started sending the answer, while the client reads it and sends its next
        request; run while the next request waits for its model instead, it would leave that
        model's answer waiting on the loop. Otherwise the jobs gathered within ``BATCH_SECONDS``
        run in one go (under load: less gateway CPU per request than one by one), or earlier: while the next request waits for its
        model (:meth:`run_queued`, handed to the backend as ``while_waiting``), or when the
        client's next request settles."""
        self._jobs.append(_Job(client, function))
        self._pending[client] = self._pending.get(client, 0) + 1
        if soon:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_soon(self._on_timer)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(BATCH_SECONDS, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._run_queued()

    def _on_commit_timer(self) -> None:
        self._commit_timer = None
        self._commit_quietly()

    def _commit_quietly(self) -> None:
        try:
            self.commit()
        except Exception:  # noqa: BLE001 (commit logged it and kept it for each job's client)
            return

    def run_queued(self) -> None:
        """Run the queued jobs now (in the loop's open transaction); never raises: a failure is
        kept for each failed job's client."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._run_queued()

    def _run_queued(self) -> None:
        """Run the queued jobs, each in a savepoint of the open transaction (opened if none is)."""
        jobs, self._jobs, self._pending = self._jobs, [], {}
        if not jobs:
            return
        try:
            self._begin()
        except Exception as error:  # noqa: BLE001 (the store is unreachable: every job failed)
            for job in jobs:
                job.error = error
                self._fail(job)
            return
        _run_each(self._transaction, jobs)
        self._uncommitted += jobs
        for job in jobs:
            if job.error is not None:
                self._fail(job)
        if not self._commit_seconds or len(self._uncommitted) >= MAX_BATCH_JOBS:
            self._commit_quietly()

    def _begin(self) -> None:
        """Open the transaction jobs run in, if none is; it commits within ``commit_seconds``."""
        if self._open is not None:
            return
        opened = self._transaction()
        opened.__enter__()
        self._open = opened
        if self._commit_seconds:
            self._commit_timer = asyncio.get_running_loop().call_later(self._commit_seconds, self._on_commit_timer)

    def commit(self) -> None:
        """Commit the open transaction (if any); a failed commit is every job's failure, and raised."""
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        opened, self._open = self._open, None
        jobs, self._uncommitted = self._uncommitted, []
        if opened is None:
            return
        try:
            opened.__exit__(None, None, None)
        except Exception as error:
            log.error("committing the detection of %d requests failed", len(jobs), exc_info=error)
            for job in jobs:
                self._failures[job.client] = job.error = job.error or error
            raise

    def _fail(self, job: _Job) -> None:
        log.error("detection failed for client %s", job.client, exc_info=job.error)
        self._failures[job.client] = cast(BaseException, job.error)

    def run(self) -> None:
        """Run every queued job now, on this thread, and commit."""
        self.run_queued()
        self.commit()

    def call(self, client: str, function: Callable[[], T], commit: bool = True) -> T:
        """Run ``function`` now, after ``client``'s queued jobs, in the loop's transaction; with
        ``commit``, committed when this returns. For the writes an answer must wait for (evidence):
        made on this thread's connection they keep its write-back cache valid, which a commit by
        another connection (the worker's) drops whole (``moat bench``: reloading every client's state
        after each evidence write was ~5% of the gateway's CPU under load)."""
        self.settle(client)
        self._begin()
        with self._transaction():
            result = function()
        if commit or not self._commit_seconds:
            self.commit()
        return result

    def settle(self, client: str) -> None:
        """Run the queue if ``client`` has a job in it; raise (once) a failure of its earlier jobs."""
        if self._pending.get(client):
            self._run_queued()
        failure = self._failures.pop(client, None)
        if failure is not None:
            raise failure

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.run()
