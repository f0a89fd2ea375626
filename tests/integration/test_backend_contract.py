"""Every registered backend honours the Backend contract (same tests, parametrized over all)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

import gateway.backends.embedded  # noqa: F401  (registers)
import gateway.backends.upstream  # noqa: F401  (registers)
from gateway.backends import BACKENDS, Backend, create_backend
from gateway.config import ComponentConfig
from gateway.errors import DeadlineExceeded
from gateway.types import InferRequest, ModelMetadata
from tests.integration.conftest import TINY_INPUT, TINY_OUTPUT
from tests.servers.procs import Proc


def _embedded(tiny: Path, kserve: Proc) -> Backend:
    params = {"torchscript": str(tiny), "device": "cpu", "inputs": [TINY_INPUT], "outputs": [TINY_OUTPUT]}
    return create_backend("m", ComponentConfig("embedded", params), "models[0].backend")


def _upstream(tiny: Path, kserve: Proc) -> Backend:
    params = {"address": f"127.0.0.1:{kserve.info['grpc_port']}", "model": "tiny-classifier"}
    return create_backend("m", ComponentConfig("upstream", params), "models[0].backend")


def _upstream_batching(tiny: Path, kserve: Proc) -> Backend:
    params = {"address": f"127.0.0.1:{kserve.info['grpc_port']}", "model": "tiny-classifier", "max_batch_rows": 64}
    return create_backend("m", ComponentConfig("upstream", params), "models[0].backend")


BUILDERS: dict[str, Callable[[Path, Proc], Backend]] = {
    "embedded": _embedded, "upstream": _upstream, "upstream (batching)": _upstream_batching}


def test_every_registered_backend_has_a_contract_builder() -> None:
    assert set(BACKENDS.names()) <= set(BUILDERS), "add the new backend to BUILDERS"


@pytest.fixture(params=sorted(BUILDERS))
async def backend(request: pytest.FixtureRequest, tiny_torchscript: Path, kserve: Proc) -> AsyncIterator[Backend]:
    built = BUILDERS[request.param](tiny_torchscript, kserve)
    await built.start()
    yield built
    await built.close()


def _inputs(metadata: ModelMetadata, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        spec.name: rng.random((batch, *[d for d in spec.shape[1:]])).astype(spec.dtype)
        for spec in metadata.inputs
    }


async def test_metadata_declares_tensors(backend: Backend) -> None:
    metadata = await backend.metadata()
    assert metadata.name == "m"
    assert metadata.inputs and metadata.outputs
    assert await backend.ready()


async def test_infer_returns_every_declared_output_with_its_dtype_and_batch(backend: Backend) -> None:
    metadata = await backend.metadata()
    response = await backend.infer(InferRequest("m", _inputs(metadata, batch=3)), deadline=None)
    assert list(response.outputs) == [spec.name for spec in metadata.outputs]
    for spec in metadata.outputs:
        array = response.outputs[spec.name]
        assert array.dtype == spec.dtype
        assert array.shape == (3, *spec.shape[1:])


async def test_infer_is_deterministic(backend: Backend) -> None:
    metadata = await backend.metadata()
    inputs = _inputs(metadata, batch=4, seed=1)
    first = await backend.infer(InferRequest("m", inputs), deadline=None)
    second = await backend.infer(InferRequest("m", inputs), deadline=None)
    for name in first.outputs:
        np.testing.assert_array_equal(first.outputs[name], second.outputs[name])


async def test_expired_deadline_is_refused(backend: Backend) -> None:
    metadata = await backend.metadata()
    with pytest.raises(DeadlineExceeded):
        await backend.infer(InferRequest("m", _inputs(metadata, batch=1)), deadline=time.monotonic() - 1)


async def test_infer_lends_the_loop_to_while_waiting_once_before_the_answer(backend: Backend) -> None:
    """The data plane's hook for deferred detection: called once, on the loop's thread, while the
    request is with the model (before infer returns)."""
    import threading

    metadata = await backend.metadata()
    calls: list[str] = []
    response = await backend.infer(InferRequest("m", _inputs(metadata, batch=2)), deadline=None,
                                   while_waiting=lambda: calls.append(threading.current_thread().name))
    assert calls == [threading.current_thread().name]
    assert list(response.outputs) == [spec.name for spec in metadata.outputs]
