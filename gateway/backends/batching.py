"""Dynamic batching: concurrent requests to one model run as one forward pass (or one upstream call).

A request waits in a queue; a single collector takes the oldest one, keeps taking compatible
requests (same method, same trailing shapes and dtypes) until ``max_rows`` rows are gathered or
``max_delay`` seconds have passed since it took the first, runs them as one batch and hands each
request its rows back. At most ``max_in_flight`` batches run at once; while they run, newcomers
queue, so under load batches form even with ``max_delay = 0`` (which adds no latency to a lone
request); a positive delay trades that much latency for larger batches. This is Triton's dynamic
batcher (``max_queue_delay_microseconds``, ``preferred_batch_size``) in miniature. The embedded
backend runs one batch at a time on its model thread (:func:`on_executor`); the upstream backend
keeps two calls in flight, so the model server never waits for the gateway between batches.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.errors import ConfigError, DeadlineExceeded

# (method, inputs each [B, ...], the batch's deadline or None, started) -> outputs each [B, ...];
# ``started()``, where not None, is called once the batch is under way (the loop is free to lend).
Started = Callable[[], None] | None
RunBatch = Callable[[Hashable, list[np.ndarray], "float | None", Started], Awaitable[list[np.ndarray]]]


def on_executor(run: Callable[[Hashable, list[np.ndarray]], list[np.ndarray]], executor: Executor) -> RunBatch:
    """A :data:`RunBatch` running the blocking ``run(method, arrays)`` on ``executor``."""

    async def run_there(method: Hashable, arrays: list[np.ndarray], deadline: float | None,
                        started: Started) -> list[np.ndarray]:
        running = asyncio.get_running_loop().run_in_executor(executor, run, method, arrays)
        if started is not None:
            started()
        return await running

    return run_there


def count_param(params: Mapping[str, Any], where: str, name: str, default: int) -> int:
    """``params[name]`` (or ``default``) checked to be an integer >= 1."""
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}.{name}", f"must be an integer >= 1, got {value!r}")
    return value


def batching_params(params: Mapping[str, Any], where: str, default_rows: int) -> tuple[int, float]:
    """``max_batch_rows`` (an integer >= 1) and ``max_batch_delay_ms`` (in [0, 1000]) of a backend's
    params, validated; returns (rows, delay in seconds)."""
    rows = count_param(params, where, "max_batch_rows", default_rows)
    delay = params.get("max_batch_delay_ms", 0.0)
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= 1000:
        raise ConfigError(f"{where}.max_batch_delay_ms", f"must be a number of milliseconds in [0, 1000], got {delay!r}")
    return rows, float(delay) / 1000.0


@dataclass
class _Pending:
    method: Hashable
    arrays: list[np.ndarray]
    deadline: float | None
    future: asyncio.Future[list[np.ndarray]]
    while_waiting: Callable[[], None] | None = None  # called once its batch runs (see Backend.infer)
    rows: int = field(init=False)
    signature: tuple[object, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.rows = int(self.arrays[0].shape[0])
        self.signature = (self.method, *((a.shape[1:], a.dtype.str) for a in self.arrays))


class DynamicBatcher:
    """Batches concurrent ``submit`` calls; at most ``max_in_flight`` batches run at once."""

    def __init__(self, run: RunBatch, *, max_rows: int, max_delay: float, max_in_flight: int = 1,
                 on_batch: Callable[[int], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if max_delay < 0:
            raise ValueError(f"max_delay must be >= 0, got {max_delay}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._run, self._on_batch = run, on_batch  # on_batch(rows) as each batch starts (a metric)
        self.max_rows, self.max_delay, self.max_in_flight, self._clock = max_rows, max_delay, max_in_flight, clock
        self._queue: deque[_Pending] = deque()
        self._arrived: asyncio.Event | None = None
        self._freed: asyncio.Event | None = None  # set when a running batch ends
        self._in_flight = 0  # batches running now
        self._collector: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.batches = 0  # batches run so far (for tests and metrics)

    async def submit(self, method: Hashable, arrays: Sequence[np.ndarray], deadline: float | None = None, *,
                     while_waiting: Callable[[], None] | None = None) -> list[np.ndarray]:
        """Run ``method`` on ``arrays`` (each [B, ...], equal B) within some batch; its outputs' rows.
        ``while_waiting`` is called on the loop once that batch is under way."""
        loop = asyncio.get_running_loop()
        pending = _Pending(method, list(arrays), deadline, loop.create_future(), while_waiting)
        if self.max_delay == 0 and not self._queue and self._in_flight < self.max_in_flight:
            # Nothing to wait for and a slot free: run it alone, from this task. Through the
            # collector it took two more turns of the loop (~0.3 ms of a lone request's latency).
            self._in_flight += 1
            try:
                await self._dispatch([pending])
            finally:
                self._slot_freed()
            return pending.future.result()
        if self._collector is None or self._collector.done():
            self._arrived, self._freed = asyncio.Event(), asyncio.Event()
            self._collector = loop.create_task(self._collect())
        self._queue.append(pending)
        self._arrived.set()  # type: ignore[union-attr]
        return await pending.future

    async def close(self) -> None:
        for task in [self._collector, *self._running]:
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        for pending in self._queue:
            if not pending.future.done():
                pending.future.cancel()

    async def _next(self, timeout: float | None) -> bool:
        """Wait until the queue is non-empty (at most ``timeout`` s); whether it is."""
        while not self._queue:
            self._arrived.clear()  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)  # type: ignore[union-attr]
            except TimeoutError:
                return bool(self._queue)
        return True

    async def _gather(self) -> list[_Pending]:
        """The next batch: the oldest request plus compatible ones, within max_rows and max_delay."""
        await self._next(None)
        first = self._queue.popleft()
        batch, rows, skipped = [first], first.rows, []
        until = self._clock() + self.max_delay
        while rows < self.max_rows:
            if not self._queue:
                left = until - self._clock()
                if left <= 0 or not await self._next(left):
                    break
            item = self._queue.popleft()
            if item.signature == first.signature and rows + item.rows <= self.max_rows:
                batch.append(item)
                rows += item.rows
            else:
                skipped.append(item)
        self._queue.extendleft(reversed(skipped))  # they keep their place at the front
        return batch

    def _live(self, batch: list[_Pending]) -> list[_Pending]:
        """The batch without cancelled callers and those whose deadline passed (failed here)."""
        now = self._clock()
        for pending in batch:
            if not pending.future.done() and pending.deadline is not None and now >= pending.deadline:
                pending.future.set_exception(DeadlineExceeded("deadline expired while queued for the model"))
        return [p for p in batch if not p.future.done()]

    async def _collect(self) -> None:
        while True:
            await self._next(None)
            if self._in_flight >= self.max_in_flight:
                self._freed.clear()  # type: ignore[union-attr]
                await self._freed.wait()  # type: ignore[union-attr]
                continue
            batch = self._live(await self._gather())
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._dispatch(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slot_freed()

    def _slot_freed(self) -> None:
        self._in_flight -= 1
        if self._freed is not None:
            self._freed.set()

    async def _dispatch(self, batch: list[_Pending]) -> None:
        arrays = (batch[0].arrays if len(batch) == 1 else
                  [np.concatenate(parts) for parts in zip(*(p.arrays for p in batch), strict=True)])
        # The latest deadline: an earlier caller's expiry must not fail the others (each caller's
        # own deadline still bounds its wait, see the backends).
        deadlines = [p.deadline for p in batch]
        deadline = None if None in deadlines else max(deadlines)  # type: ignore[type-var]

        if self._on_batch is not None:
            self._on_batch(len(arrays[0]))
        waiting = [p.while_waiting for p in batch if p.while_waiting is not None]

        def started() -> None:
            for while_waiting in waiting:
                while_waiting()

        try:
            outputs = await self._run(batch[0].method, arrays, deadline, started if waiting else None)
        except asyncio.CancelledError:  # closing: its callers are cancelled with it
            for pending in batch:
                pending.future.cancel()
            raise
        except Exception as error:  # noqa: BLE001 - every caller of the batch gets the error
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        self.batches += 1
        start = 0
        for pending in batch:
            rows = slice(start, start + pending.rows)
            start += pending.rows
            if not pending.future.done():
                pending.future.set_result([output[rows] for output in outputs])
