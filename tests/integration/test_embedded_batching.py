"""The embedded backend batches concurrent requests: same answers as one pass per request, fewer
passes, and its batching parameters are checked when the gateway is built."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from gateway.backends import create_backend
from gateway.config import ComponentConfig
from gateway.errors import ConfigError
from gateway.types import InferRequest
from tests.integration.conftest import TINY_INPUT, TINY_OUTPUT


def _backend(torchscript: Path, **params: object):
    config = ComponentConfig("embedded", {"torchscript": str(torchscript), "device": "cpu",
                                          "inputs": [TINY_INPUT], "outputs": [TINY_OUTPUT], **params})
    return create_backend("tiny", config, "models[0].backend")


async def test_concurrent_requests_get_their_own_answers_in_fewer_passes(tiny_torchscript: Path) -> None:
    batched, single = _backend(tiny_torchscript), _backend(tiny_torchscript, max_batch_rows=1)
    rng = np.random.default_rng(0)
    requests = [InferRequest("tiny", {"input": rng.random((1 + i % 4, 1, 4, 4), dtype=np.float32)})
                for i in range(64)]
    answers = await asyncio.gather(*(batched.infer(r, None) for r in requests))
    alone = [await single.infer(r, None) for r in requests]
    for mine, reference, request in zip(answers, alone, requests, strict=True):
        assert mine.outputs["probabilities"].shape == (len(request.inputs["input"]), 3)
        np.testing.assert_allclose(mine.outputs["probabilities"], reference.outputs["probabilities"], atol=1e-6)
    assert batched.batcher.batches < len(requests) / 2
    assert single.batcher.batches == len(requests)
    await batched.close()
    await single.close()


async def test_a_delay_gathers_requests_that_arrive_apart(tiny_torchscript: Path) -> None:
    backend = _backend(tiny_torchscript, max_batch_delay_ms=200)
    images = np.zeros((1, 1, 4, 4), np.float32)

    async def later() -> object:
        await asyncio.sleep(0.02)
        return await backend.infer(InferRequest("tiny", {"input": images}), None)

    await asyncio.gather(backend.infer(InferRequest("tiny", {"input": images}), None), later())
    assert backend.batcher.batches == 1
    await backend.close()


@pytest.mark.parametrize(("param", "value", "message"), [
    ("max_batch_rows", 0, "must be an integer >= 1, got 0"),
    ("max_batch_rows", True, "must be an integer >= 1, got True"),
    ("max_batch_rows", "8", "must be an integer >= 1, got '8'"),
    ("max_batch_delay_ms", -1, "must be a number of milliseconds in [0, 1000], got -1"),
    ("max_batch_delay_ms", 5000, "must be a number of milliseconds in [0, 1000], got 5000"),
    ("max_batch_delay_ms", "2ms", "must be a number of milliseconds in [0, 1000], got '2ms'"),
])
def test_bad_batching_params_name_the_field(tiny_torchscript: Path, param: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        _backend(tiny_torchscript, **{param: value})
    assert f"models[0].backend.params.{param}" in str(error.value)
    assert message in str(error.value)
