"""Scenario ``embedded``: the embedded backend's throughput at concurrency 1 and 32.

The backend runs in this process, as the gateway runs it (one worker thread per model, requests
from the event loop); ``concurrency`` coroutines each send batch-1 requests of Fashion-MNIST test
images back to back. Contenders: ``batched`` (dynamic batching, ``max_batch_delay_ms`` 0, the
default) and ``unbatched`` (``max_batch_rows: 1``: one forward pass per request, as before
batching). The demo encoder is the model of the target (c=32 >= 3x c=1).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.results import Result, Sample, find, median_result

CONTENDERS = {"batched": {}, "unbatched": {"max_batch_rows": 1}}
SPECS = {"fashion-encoder": ("embedding", 128), "fashion-classifier": ("probabilities", 10)}


def _backend(model: str, extra: dict[str, Any]) -> Any:
    from gateway.backends.embedded import create_embedded

    output, width = SPECS[model]
    params = {"zoo": model, "device": "auto", **extra,
              "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
              "outputs": [{"name": output, "datatype": "FP32", "shape": [-1, width]}]}
    return create_embedded(model, params, f"bench.{model}")


async def _round(backend: Any, images: np.ndarray, concurrency: int, requests: int) -> Sample:
    from gateway.types import InferRequest

    latencies: list[float] = []
    remaining = [requests]

    async def worker(index: int) -> None:
        i = index
        while remaining[0] > 0:
            remaining[0] -= 1
            request = InferRequest(model_name=backend.name, inputs={"input": images[i % len(images)][None]})
            i += concurrency
            started = time.perf_counter()
            await backend.infer(request, None)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return Sample(np.asarray(latencies), time.perf_counter() - started)


async def _measure(models: Sequence[str], concurrencies: Sequence[int], requests: dict[int, int],
                   rounds: int, images: np.ndarray) -> list[Result]:
    backends = {(m, c): _backend(m, extra) for m in models for c, extra in CONTENDERS.items()}
    samples: dict[tuple[str, str, int], list[Sample]] = {}
    try:
        for backend in backends.values():
            await _round(backend, images, 8, 64)  # warm-up
        for _ in range(rounds):
            for (model, contender), backend in backends.items():
                for concurrency in concurrencies:
                    sample = await _round(backend, images, concurrency, requests[concurrency])
                    samples.setdefault((model, contender, concurrency), []).append(sample)
    finally:
        for backend in backends.values():
            await backend.close()
    return [median_result(s, scenario="embedded", model=m, contender=c, concurrency=k)
            for (m, c, k), s in samples.items()]


def run_embedded(*, models: Sequence[str] = ("fashion-encoder",), concurrencies: Sequence[int] = (1, 32),
                 requests: dict[int, int] | None = None, rounds: int = 5, seed: int = 0) -> list[Result]:
    from bench.overhead import test_images

    requests = requests or {1: 500, 32: 2000}
    return asyncio.run(_measure(models, concurrencies, requests, rounds, test_images(1000, seed)))


def embedded_ratios(results: Sequence[Result]) -> list[dict[str, Any]]:
    """Target: batched throughput at c=32 >= 3x at c=1 (encoder); the unbatched ratio for reference."""
    ratios = []
    for model in sorted({r.model for r in results if r.scenario == "embedded"}):
        for contender in CONTENDERS:
            low = find(results, scenario="embedded", model=model, contender=contender, concurrency=1)
            high = find(results, scenario="embedded", model=model, contender=contender, concurrency=32)
            if low is None or high is None:
                continue
            value = high.throughput_rps / low.throughput_rps
            target = contender == "batched" and model == "fashion-encoder"
            ratios.append({"target": "embedded throughput c=32 / c=1", "subject": f"{model} {contender}",
                           "value": value, "bound": ">= 3.0" if target else "info",
                           "holds": value >= 3.0 if target else True})
    return ratios
