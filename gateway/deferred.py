"""Deferred detection: a small request is answered first and detected right after, in order.

The gateway answers a request of at most ``server.deferred_max_rows`` rows with the defenses its
client's standing called for *before* it (the state all its earlier requests left), then records
the request's own detection after the answer has left: detection no longer sits on the request's
latency (``moat bench``: the protect stage, ~0.3–0.5 ms of Python and ~25 store statements, plus
two thread-pool hops, was most of what full protection added). Ordering keeps the result what
inline detection would give one request later, deterministically:

- jobs of one client run in submission order;
- before a request's defenses, the client's queued jobs have run (:meth:`LoopDetection.settle`,
  :meth:`DetectionWorker.settled`), so its answer reflects every earlier request;
- queued jobs run a batch per store transaction, each in a savepoint: one commit per batch.

Two runners. :class:`LoopDetection` runs jobs on the event loop's thread, for stores whose calls
never wait on a network (memory; sqlite with its write-back cache): no second thread contends for
the GIL. :class:`DetectionWorker` runs them on threads (sharded by client), for redis, whose round
trips must stay off the loop; it also runs store calls that must finish before an answer leaves
(a first look-up of a client, big batches judged inline; evidence too, on redis: on local stores
:meth:`LoopDetection.call` writes it on the loop).

A job that fails is logged and reported to the client's next request (UNAVAILABLE when the store
failed), so a store outage still reaches clients instead of silently skipping detection. What a
``kill -9`` can lose: the detection of answers sent in the last few milliseconds (at most one
request per client: its next request waits for it); watermark evidence is always written first.
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
from typing import Any, ContextManager, TypeVar

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
    """Run ``jobs`` in order in one transaction, each in a savepoint, so a failing job undoes only
    its own writes; each job's result or error is left on it (a failed commit is every job's error)."""
    try:
        with transaction():
            for job in jobs:
                try:
                    with transaction():
                        job.result = job.function()
                except Exception as error:  # noqa: BLE001 (reported to the client; never stops the runner)
                    job.error = error
    except Exception as error:  # noqa: BLE001 (the commit failed: no job's writes are stored)
        for job in jobs:
            job.error = job.error or error


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the waiting request was cancelled (deadline, client gone)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class LoopDetection:
    """Deferred detection on the event loop's own thread, for stores whose calls never wait on a
    network (memory, sqlite with its write-back cache): queued jobs run in the loop's next
    iteration, once the answer that queued them is on its way (several answers' jobs together
    under load). No second thread competes for the GIL (``moat bench``: with the detection
    thread, requests at concurrency 1 spent ~0.35 ms more in the gateway, waiting for the GIL,
    than the detection itself took).

    Jobs run in submission order, a batch per store transaction, each in a savepoint; a failure
    is kept for the client's next request, as :class:`DetectionWorker` does.
    """

    def __init__(self, transaction: Callable[[], ContextManager[Any]] = nullcontext) -> None:
        self._transaction = transaction
        self._jobs: list[_Job] = []
        self._pending: dict[str, int] = {}
        self._failures: dict[str, BaseException] = {}
        self._timer: asyncio.Handle | None = None

    @property
    def pending(self) -> bool:
        return bool(self._jobs)

    def submit(self, client: str, function: Callable[[], Any], busy: bool = False) -> None:
        """Queue ``function`` (call on the loop); it runs in the loop's next iteration, or within
        ``BATCH_SECONDS`` when the gateway is ``busy`` with other requests."""
        self._jobs.append(_Job(client, function))
        self._pending[client] = self._pending.get(client, 0) + 1
        if self._timer is None:
            loop = asyncio.get_running_loop()
            # Busy (other requests in flight): jobs gather for BATCH_SECONDS into one transaction
            # (moat bench, concurrency 32: 0.91 instead of 1.10 ms of gateway CPU per request).
            # Quiet: at once, before the client's next request comes and would wait for them.
            self._timer = loop.call_later(BATCH_SECONDS, self._on_timer) if busy else loop.call_soon(self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.run()

    def run(self) -> None:
        """Run every queued job now, on this thread, in one transaction."""
        jobs, self._jobs, self._pending = self._jobs, [], {}
        if not jobs:
            return
        _run_jobs(self._transaction, jobs)
        for job in jobs:
            if job.error is not None:  # kept for the client's next request
                log.error("detection failed for client %s", job.client, exc_info=job.error)
                self._failures[job.client] = job.error

    def call(self, client: str, function: Callable[[], T]) -> T:
        """Run ``function`` now, after ``client``'s queued jobs, in a transaction of its own:
        committed when this returns. For the writes an answer must wait for (evidence): made on
        this thread's connection they keep its write-back cache valid, which a commit by another
        connection (the worker's) drops whole (``moat bench``: reloading every client's state after
        each evidence write was ~5% of the gateway's CPU under load)."""
        self.settle(client)
        with self._transaction():
            return function()

    def settle(self, client: str) -> None:
        """Run the queue if ``client`` has a job in it; raise (once) a failure of its earlier jobs."""
        if self._pending.get(client):
            self.run()
        failure = self._failures.pop(client, None)
        if failure is not None:
            raise failure

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.run()
