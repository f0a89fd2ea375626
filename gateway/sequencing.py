"""When and where a request's state-store work runs: the data plane asks, a sequencing decides.

The data plane needs five things of the store, each in order per client: a client's standing before
its answer (:meth:`look_up`), the watermark evidence durable before the answer leaves (:meth:`keep`),
a big batch judged before its answer (:meth:`in_order`), a small request detected after it
(:meth:`detect_after`), and the store settled for admin reads (:meth:`settle`, :meth:`for_client`).
How that is done depends on what the store declares (:class:`contracts.state.StateStore`), so the
choice is made once, here, by :func:`create_sequencing`:

- :class:`OnLoopSequencing` for stores whose calls never wait on a network (``local``: memory,
  sqlite): detection runs on the event loop once the answer is on its way (gathered under load, see
  :class:`~gateway.deferred.LoopDetection`), evidence and look-ups too; only big batches go to a
  worker thread.
- :class:`OnWorkerSequencing` for stores that wait on a network (redis): every call goes to worker
  threads (:class:`~gateway.deferred.DetectionWorker`), in order per client, so round trips overlap.

Either way a store that went away surfaces as UNAVAILABLE (retryable), never INTERNAL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Protocol, TypeVar

from contracts.state import StateStore
from gateway.deferred import DetectionWorker, LoopDetection
from gateway.errors import Unavailable

T = TypeVar("T")
STORE_ERRORS = (ConnectionError, TimeoutError, OSError)  # what a state store that went away raises


class Sequencing(Protocol):
    """The order in which one gateway's requests touch the state store (see the module docstring)."""

    def while_waiting(self, alone: bool) -> Callable[[], None] | None:
        """Store work the loop may do while a request waits for its model (``alone``: it is the
        only request in flight), or None."""
        ...

    def detect_after(self, client: str, observe: Callable[[], Any], *, alone: bool) -> None:
        """Queue ``observe`` (a request's detection) to run after its answer, in order per client."""
        ...

    async def keep(self, client: str, write: Callable[[], None]) -> None:
        """Run ``write`` (evidence) durably before the answer leaves, after the client's queued work."""
        ...

    async def look_up(self, client: str, read: Callable[[], T]) -> T:
        """Run ``read`` (a client's standing) after the client's queued work."""
        ...

    async def in_order(self, client: str, function: Callable[[], T]) -> T:
        """Run ``function`` (a big batch's inline protection) after the client's queued work."""
        ...

    async def settled(self, client: str) -> None:
        """Wait until the client's queued work is stored."""
        ...

    async def settle(self) -> None:
        """Wait until every queued detection is stored (admin reads)."""
        ...

    async def for_client(self, client: str, function: Callable[[], T]) -> T:
        """Run ``function`` after the client's queued detection (admin actions on one client)."""
        ...

    async def close(self) -> None:
        """Finish queued work and stop the threads."""
        ...


def create_sequencing(store: StateStore | None, *, commit_seconds: float = 0.0) -> Sequencing:
    """The sequencing for ``store`` (None: a gateway that keeps no state)."""
    if store is None:
        return OnLoopSequencing(nullcontext, shards=4, commit_seconds=commit_seconds)
    transaction = store.transaction if store.transactional else nullcontext
    shards = 1 if store.transactional else 4
    if store.local:
        return OnLoopSequencing(transaction, shards=shards, commit_seconds=commit_seconds)
    return OnWorkerSequencing(transaction, shards=shards)


class OnWorkerSequencing:
    """Every store call on worker threads, in order per client: a batch of requests per transaction
    where the store groups them (one shard), more shards where it does not (round trips overlap)."""

    def __init__(self, transaction: Callable[[], ContextManager[Any]], *, shards: int) -> None:
        self._worker = DetectionWorker(shards=shards, transaction=transaction, thread_init=_one_native_thread)

    def while_waiting(self, alone: bool) -> Callable[[], None] | None:
        return None

    def detect_after(self, client: str, observe: Callable[[], Any], *, alone: bool) -> None:
        self._worker.submit(client, observe)

    async def keep(self, client: str, write: Callable[[], None]) -> None:
        await self.in_order(client, write)

    async def look_up(self, client: str, read: Callable[[], T]) -> T:
        return await self.in_order(client, read)

    async def in_order(self, client: str, function: Callable[[], T]) -> T:
        await self.settled(client)
        with store_outage_unavailable():
            return await self._worker.call(client, function)

    async def settled(self, client: str) -> None:
        with store_outage_unavailable():
            await self._worker.settled(client)

    async def settle(self) -> None:
        await self._worker.drain()

    async def for_client(self, client: str, function: Callable[[], T]) -> T:
        return await self._worker.call(client, function)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._worker.close)


class OnLoopSequencing:
    """A local store's calls on the event loop (detection once the answer is on its way, committed
    every ``commit_seconds``; evidence and look-ups inside the loop's open transaction, so they see
    its detection); big batches' inline protection on worker threads, after the loop commits."""

    def __init__(self, transaction: Callable[[], ContextManager[Any]], *, shards: int, commit_seconds: float) -> None:
        self._worker = DetectionWorker(shards=shards, transaction=transaction, thread_init=_one_native_thread)
        self._loop = LoopDetection(transaction, commit_seconds=commit_seconds)

    def while_waiting(self, alone: bool) -> Callable[[], None] | None:
        # Jobs submitted alone already ran after their answer; under load they gather for a few
        # milliseconds (LoopDetection.submit), and a request waiting alone runs what is left.
        return self._loop.run_queued if self._loop.pending and alone else None

    def detect_after(self, client: str, observe: Callable[[], Any], *, alone: bool) -> None:
        self._loop.submit(client, observe, soon=alone)

    async def keep(self, client: str, write: Callable[[], None]) -> None:
        await self._on_loop(client, write, commit=True)

    async def look_up(self, client: str, read: Callable[[], T]) -> T:
        return await self._on_loop(client, read, commit=False)

    async def in_order(self, client: str, function: Callable[[], T]) -> T:
        await self.settled(client)
        with store_outage_unavailable():
            self._loop.commit()  # the worker's transaction waits for the loop's to commit
            return await self._worker.call(client, function)

    async def settled(self, client: str) -> None:
        with store_outage_unavailable():
            self._loop.settle(client)
            await self._worker.settled(client)

    async def settle(self) -> None:
        self._loop.run()
        await self._worker.drain()

    async def for_client(self, client: str, function: Callable[[], T]) -> T:
        self._loop.run()
        return await self._worker.call(client, function)

    async def close(self) -> None:
        self._loop.close()
        await asyncio.get_running_loop().run_in_executor(None, self._worker.close)

    async def _on_loop(self, client: str, function: Callable[[], T], commit: bool) -> T:
        """On the loop, after the client's work queued on the worker (big batches) and on the loop
        (:meth:`LoopDetection.call` runs that first)."""
        with store_outage_unavailable():
            await self._worker.settled(client)
            return self._loop.call(client, function, commit=commit)


@contextmanager
def store_outage_unavailable() -> Iterator[None]:
    """A state store that went away is UNAVAILABLE to the client (retryable), not INTERNAL."""
    try:
        yield
    except STORE_ERRORS as error:
        raise Unavailable("the state store is unavailable; try again") from error


def _one_native_thread() -> None:
    """Detection hashes one request's few rows at a time: FAISS's OpenMP threads only spin-wait
    for work that one thread does faster (they showed as ~9% of the gateway's samples under load)."""
    import faiss

    faiss.omp_set_num_threads(1)
