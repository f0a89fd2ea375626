"""Closed-loop load with the stock ``tritonclient`` (its asyncio client), as users would send it.

``concurrency`` workers share one channel; each sends its next request as soon as the previous
answer arrives, until ``requests`` answers in all. Each request is one image (batch 1) taken in
turn from a pool of real images, under the worker's API key (workers take keys round-robin).
Never imports moat's ``protos.inference_pb2`` (it would clash with tritonclient's protos).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput

from bench.results import Sample

MAX_BYTES = 64 * 1024 * 1024
CHANNEL_ARGS = [("grpc.max_send_message_length", MAX_BYTES), ("grpc.max_receive_message_length", MAX_BYTES)]


def _inputs(images: np.ndarray) -> list[list[InferInput]]:
    """One pre-encoded request per image: float32 [N, 1, 28, 28] -> N single-image InferInputs."""
    prepared = []
    for image in images:
        tensor = InferInput("input", [1, *image.shape], "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(image[None], dtype=np.float32))
        prepared.append([tensor])
    return prepared


class Load:
    """A reusable client for one endpoint and model; ``run`` measures one round."""

    def __init__(self, url: str, model: str, images: np.ndarray, keys: Sequence[str | None]) -> None:
        self.url, self.model = url, model
        self._requests = _inputs(images)
        self._headers = [None if key is None else {"authorization": f"Bearer {key}"} for key in keys]
        self._client: triton_aio.InferenceServerClient | None = None
        self._next = 0

    async def __aenter__(self) -> Load:
        self._client = triton_aio.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()

    async def _worker(self, index: int, remaining: list[int], latencies: list[float]) -> None:
        headers = self._headers[index % len(self._headers)]
        client = self._client
        while remaining[0] > 0:
            remaining[0] -= 1
            request = self._requests[self._next % len(self._requests)]
            self._next += 1
            started = time.perf_counter()
            await client.infer(self.model, request, headers=headers)  # type: ignore[union-attr]
            latencies.append(time.perf_counter() - started)

    async def run(self, concurrency: int, requests: int) -> Sample:
        """``requests`` answers with ``concurrency`` requests in flight; latencies in seconds."""
        latencies: list[float] = []
        remaining = [requests]
        started = time.perf_counter()
        await asyncio.gather(*(self._worker(i, remaining, latencies) for i in range(concurrency)))
        return Sample(np.asarray(latencies), time.perf_counter() - started)
