"""The dynamic batcher: concurrent requests share forward passes and each gets exactly its rows."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gateway.backends.batching import DynamicBatcher, on_executor
from gateway.errors import DeadlineExceeded


class Doubler:
    """A model on the worker thread: outputs 2x and the row sums; records each batch's row count."""

    def __init__(self, seconds: float = 0.0, fail_on: float | None = None) -> None:
        self.seconds, self.fail_on = seconds, fail_on
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, method: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(len(arrays[0]))
        time.sleep(self.seconds)
        x = arrays[0]
        if self.fail_on is not None and np.any(x == self.fail_on):
            raise RuntimeError("model failed")
        return [x * 2, x.reshape(len(x), -1).sum(axis=1)]


@pytest.fixture
def executor() -> ThreadPoolExecutor:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    yield pool
    pool.shutdown()


async def test_concurrent_requests_share_batches_and_get_their_own_rows(executor: ThreadPoolExecutor) -> None:
    model = Doubler(seconds=0.02)
    batcher = DynamicBatcher(on_executor(model, executor), max_rows=64, max_delay=0.0)
    rng = np.random.default_rng(0)
    inputs = [rng.random((1 + i % 3, 2, 2), dtype=np.float32) for i in range(32)]
    answers = await asyncio.gather(*(batcher.submit("forward", [x]) for x in inputs))
    for x, (doubled, sums) in zip(inputs, answers, strict=True):
        np.testing.assert_array_equal(doubled, x * 2)
        np.testing.assert_allclose(sums, x.reshape(len(x), -1).sum(axis=1), rtol=1e-6)
    assert sum(model.batches) == sum(len(x) for x in inputs)
    assert len(model.batches) <= 3  # the first runs alone; the rest queued behind it
    assert model.threads == {"model_0"}
    await batcher.close()


async def test_batches_hold_at_most_max_rows(executor: ThreadPoolExecutor) -> None:
    model = Doubler(seconds=0.01)
    batcher = DynamicBatcher(on_executor(model, executor), max_rows=5, max_delay=0.0)
    inputs = [np.full((2, 3), i, np.float32) for i in range(20)]
    answers = await asyncio.gather(*(batcher.submit("forward", [x]) for x in inputs))
    assert max(model.batches) <= 5
    assert [float(a[0][0, 0]) for a in answers] == [2.0 * i for i in range(20)]
    await batcher.close()


async def test_incompatible_requests_are_not_mixed(executor: ThreadPoolExecutor) -> None:
    model = Doubler(seconds=0.01)
    batcher = DynamicBatcher(on_executor(model, executor), max_rows=64, max_delay=0.0)
    inputs = [np.ones((1, 2 + i % 2), np.float32) * i for i in range(10)]
    methods = ["forward" if i < 8 else "features" for i in range(10)]
    answers = await asyncio.gather(*(batcher.submit(m, [x]) for m, x in zip(methods, inputs, strict=True)))
    for x, (doubled, _) in zip(inputs, answers, strict=True):
        np.testing.assert_array_equal(doubled, x * 2)
    assert len(model.batches) >= 3  # two widths and two methods cannot share one batch
    await batcher.close()


async def test_a_positive_delay_waits_for_companions(executor: ThreadPoolExecutor) -> None:
    model = Doubler()
    batcher = DynamicBatcher(on_executor(model, executor), max_rows=64, max_delay=0.2)

    async def later(x: np.ndarray) -> list[np.ndarray]:
        await asyncio.sleep(0.02)
        return await batcher.submit("forward", [x])

    await asyncio.gather(batcher.submit("forward", [np.ones((1, 2), np.float32)]), later(np.zeros((1, 2), np.float32)))
    assert model.batches == [2]
    await batcher.close()


async def test_zero_delay_runs_a_lone_request_at_once(executor: ThreadPoolExecutor) -> None:
    model = Doubler()
    batcher = DynamicBatcher(on_executor(model, executor), max_rows=64, max_delay=0.0)
    first = await batcher.submit("forward", [np.ones((1, 2), np.float32)])
    second = await batcher.submit("forward", [np.ones((1, 2), np.float32)])
    assert model.batches == [1, 1]
    np.testing.assert_array_equal(first[0], second[0])
    await batcher.close()


async def test_a_failing_batch_fails_its_callers_only(executor: ThreadPoolExecutor) -> None:
    model = Doubler(seconds=0.02, fail_on=7.0)
    batcher = DynamicBatcher(on_executor(model, executor), max_rows=64, max_delay=0.0)
    first = asyncio.ensure_future(batcher.submit("forward", [np.zeros((1, 2), np.float32)]))
    await asyncio.sleep(0.005)  # the first batch is running; these two queue into the next one
    bad = [batcher.submit("forward", [np.full((1, 2), v, np.float32)]) for v in (7.0, 1.0)]
    results = await asyncio.gather(first, *bad, return_exceptions=True)
    assert isinstance(results[0], list)
    assert all(isinstance(r, RuntimeError) for r in results[1:])
    again = await batcher.submit("forward", [np.ones((1, 2), np.float32)])
    np.testing.assert_array_equal(again[0], np.full((1, 2), 2.0))
    await batcher.close()


async def test_a_request_whose_deadline_passed_in_the_queue_is_refused(executor: ThreadPoolExecutor) -> None:
    model = Doubler(seconds=0.05)
    batcher = DynamicBatcher(on_executor(model, executor), max_rows=64, max_delay=0.0)
    first = asyncio.ensure_future(batcher.submit("forward", [np.zeros((1, 2), np.float32)]))
    await asyncio.sleep(0.005)
    with pytest.raises(DeadlineExceeded, match="queued"):
        await batcher.submit("forward", [np.zeros((1, 2), np.float32)], deadline=time.monotonic() + 0.01)
    await first
    assert model.batches == [1]
    await batcher.close()


def test_bounds_are_checked(executor: ThreadPoolExecutor) -> None:
    with pytest.raises(ValueError, match="max_rows must be >= 1, got 0"):
        DynamicBatcher(on_executor(Doubler(), executor), max_rows=0, max_delay=0.0)
    with pytest.raises(ValueError, match="max_delay must be >= 0, got -1"):
        DynamicBatcher(on_executor(Doubler(), executor), max_rows=1, max_delay=-1)
    with pytest.raises(ValueError, match="max_in_flight must be >= 1, got 0"):
        DynamicBatcher(on_executor(Doubler(), executor), max_rows=1, max_delay=0.0, max_in_flight=0)


async def test_while_waiting_runs_once_the_batch_is_on_the_worker_thread(executor: ThreadPoolExecutor) -> None:
    started, release = threading.Event(), threading.Event()

    def model(method: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        started.set()
        release.wait(timeout=5)
        return [arrays[0] * 2]

    batcher = DynamicBatcher(on_executor(model, executor), max_rows=8, max_delay=0.0)
    seen: list[bool] = []

    def while_waiting() -> None:  # the model must already be running, and still waiting for us
        seen.append(started.wait(timeout=5))
        release.set()

    (doubled,) = await batcher.submit("forward", [np.ones((1, 2), np.float32)], while_waiting=while_waiting)
    assert seen == [True]
    np.testing.assert_array_equal(doubled, np.full((1, 2), 2, np.float32))
    await batcher.close()


class AsyncModel:
    """An asynchronous model (as an upstream server is): records how many batches run at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.running, self.most_at_once = seconds, 0, 0
        self.batches: list[int] = []
        self.deadlines: list[float | None] = []

    async def __call__(self, method: object, arrays: list[np.ndarray], deadline: float | None,
                       started: Callable[[], None] | None) -> list[np.ndarray]:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        self.batches.append(len(arrays[0]))
        self.deadlines.append(deadline)
        if started is not None:
            started()
        await asyncio.sleep(self.seconds)
        self.running -= 1
        return [arrays[0] * 2]


@pytest.mark.parametrize("in_flight", [1, 2, 3])
async def test_at_most_max_in_flight_batches_run_at_once(in_flight: int) -> None:
    model = AsyncModel(seconds=0.02)
    batcher = DynamicBatcher(model, max_rows=4, max_delay=0.0, max_in_flight=in_flight)
    inputs = [np.full((1, 2), i, np.float32) for i in range(40)]
    answers = await asyncio.gather(*(batcher.submit(("forward", "v1"), [x]) for x in inputs))
    for x, (doubled,) in zip(inputs, answers, strict=True):
        np.testing.assert_array_equal(doubled, x * 2)
    assert model.most_at_once == in_flight  # 40 rows in batches of <= 4 keep every slot busy
    assert max(model.batches) <= 4 and sum(model.batches) == 40
    await batcher.close()


async def test_a_batch_runs_until_its_latest_deadline() -> None:
    model = AsyncModel(seconds=0.05)
    batcher = DynamicBatcher(model, max_rows=8, max_delay=0.0)
    now = time.monotonic()
    blocker = asyncio.ensure_future(batcher.submit("forward", [np.ones((1, 2), np.float32)]))
    await asyncio.sleep(0.01)  # the next two queue behind it and share a batch
    await asyncio.gather(*(batcher.submit("forward", [np.ones((1, 2), np.float32)], now + seconds)
                           for seconds in (5.0, 9.0)))
    await blocker
    assert model.deadlines == [None, now + 9.0]
    await batcher.close()


async def test_close_cancels_what_queued() -> None:
    batcher = DynamicBatcher(AsyncModel(seconds=10.0), max_rows=1, max_delay=0.0, max_in_flight=2)
    waiting = [asyncio.ensure_future(batcher.submit("forward", [np.ones((1, 2), np.float32)])) for _ in range(5)]
    await asyncio.sleep(0.05)
    await batcher.close()
    await asyncio.sleep(0)
    # The first two found a free slot and nothing queued: they run from their callers' tasks,
    # which own them. The rest queued for the collector: closing cancels them.
    assert not any(w.done() for w in waiting[:2]) and all(w.cancelled() for w in waiting[2:])
    for w in waiting[:2]:
        w.cancel()


async def test_a_lone_request_runs_in_its_callers_task() -> None:
    model = AsyncModel(seconds=0.0)
    batcher = DynamicBatcher(model, max_rows=8, max_delay=0.0)
    for i in range(3):
        (doubled,) = await batcher.submit("forward", [np.full((1, 2), i, np.float32)])
        np.testing.assert_array_equal(doubled, np.full((1, 2), 2 * i))
    assert batcher._collector is None and model.batches == [1, 1, 1]
    await batcher.close()


async def test_on_batch_hears_the_rows_of_every_batch() -> None:
    rows: list[int] = []
    batcher = DynamicBatcher(AsyncModel(seconds=0.01), max_rows=8, max_delay=0.0, on_batch=rows.append)
    await asyncio.gather(*(batcher.submit("forward", [np.ones((1 + i % 2, 2), np.float32)]) for i in range(10)))
    assert sum(rows) == 15 and len(rows) < 10 and max(rows) <= 8
    await batcher.close()
