"""Dynamic batching: concurrent requests to one model run as one forward pass.

A request waits in a queue; a single collector takes the oldest one, keeps taking compatible
requests (same method, same trailing shapes and dtypes) until ``max_rows`` rows are gathered or
``max_delay`` seconds have passed since it took the first, runs them as one batch on the model's
worker thread and hands each request its rows back. While a batch runs, newcomers queue, so under
load batches form even with ``max_delay = 0`` (which adds no latency to a lone request); a
positive delay trades that much latency for larger batches. This is Triton's dynamic batcher
(``max_queue_delay_microseconds``, ``preferred_batch_size``) in miniature.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from gateway.errors import DeadlineExceeded

# method name, inputs (each [B, ...]) -> outputs (each [B, ...]), on the worker thread
RunBatch = Callable[[str, list[np.ndarray]], list[np.ndarray]]


@dataclass
class _Pending:
    method: str
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
    """Batches concurrent ``submit`` calls; one batch at a time on ``executor``."""

    def __init__(self, run: RunBatch, executor: Executor, *, max_rows: int, max_delay: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if max_delay < 0:
            raise ValueError(f"max_delay must be >= 0, got {max_delay}")
        self._run, self._executor = run, executor
        self.max_rows, self.max_delay, self._clock = max_rows, max_delay, clock
        self._queue: deque[_Pending] = deque()
        self._arrived: asyncio.Event | None = None
        self._collector: asyncio.Task[None] | None = None
        self.batches = 0  # batches run so far (for tests and metrics)

    async def submit(self, method: str, arrays: Sequence[np.ndarray], deadline: float | None = None, *,
                     while_waiting: Callable[[], None] | None = None) -> list[np.ndarray]:
        """Run ``method`` on ``arrays`` (each [B, ...], equal B) within some batch; its outputs' rows.
        ``while_waiting`` is called on the loop once that batch is running on the worker thread."""
        loop = asyncio.get_running_loop()
        if self._collector is None or self._collector.done():
            self._arrived = asyncio.Event()
            self._collector = loop.create_task(self._collect())
        pending = _Pending(method, list(arrays), deadline, loop.create_future(), while_waiting)
        self._queue.append(pending)
        self._arrived.set()  # type: ignore[union-attr]
        return await pending.future

    async def close(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            try:
                await self._collector
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

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [p for p in await self._gather() if not p.future.done()]  # skip cancelled callers
            now = self._clock()
            for pending in batch:
                if pending.deadline is not None and now >= pending.deadline:
                    pending.future.set_exception(DeadlineExceeded("deadline expired while queued for the model"))
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                continue
            arrays = (batch[0].arrays if len(batch) == 1 else
                      [np.concatenate(parts) for parts in zip(*(p.arrays for p in batch), strict=True)])
            running = loop.run_in_executor(self._executor, self._run, batch[0].method, arrays)
            for pending in batch:
                if pending.while_waiting is not None:
                    pending.while_waiting()
            try:
                outputs = await running
            except Exception as error:  # noqa: BLE001 - every caller of the batch gets the error
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            self.batches += 1
            start = 0
            for pending in batch:
                rows = slice(start, start + pending.rows)
                start += pending.rows
                if not pending.future.done():
                    pending.future.set_result([output[rows] for output in outputs])
