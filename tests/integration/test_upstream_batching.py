"""Upstream batching against a real KServe server: concurrent requests share upstream calls, each
gets exactly its own rows and id, and what cannot be batched goes upstream alone."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.backends import create_backend
from gateway.backends.upstream import UpstreamBackend
from gateway.config import ComponentConfig, ConfigError
from gateway.errors import DeadlineExceeded, GatewayError
from gateway.types import InferRequest
from protos import inference_pb2 as pb
from tests.integration.conftest import ALICE, GatewayFactory, stub, upstream_model
from tests.servers.procs import Proc


async def _backend(kserve: Proc, model: str, **batching: object) -> UpstreamBackend:
    params = {"address": f"127.0.0.1:{kserve.info['grpc_port']}", **batching}
    backend = create_backend(model, ComponentConfig("upstream", params), "models[0].backend")
    await backend.start()
    return backend  # type: ignore[return-value]


def _echo(rows: int, value: float, request_id: str = "") -> InferRequest:
    x = np.full((rows, 2), value, np.float32) + np.arange(rows, dtype=np.float32)[:, None]
    return InferRequest("batch-echo", {"x": x}, id=request_id)


async def test_concurrent_requests_share_upstream_calls_and_get_their_own_rows(kserve: Proc) -> None:
    backend = await _backend(kserve, "batch-echo", max_batch_rows=16)
    requests = [_echo(1 + i % 2, 10.0 * i, f"req-{i}") for i in range(24)]
    answers = await asyncio.gather(*(backend.infer(r, None) for r in requests))
    for request, answer in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(answer.outputs["tripled"], request.inputs["x"] * 3)
        assert answer.id == request.id and answer.model_name == "batch-echo"
    call_rows = np.concatenate([a.outputs["call_rows"] for a in answers])
    assert call_rows.max() > 1, "no two requests shared an upstream call"
    assert call_rows.max() <= 16
    assert backend.batcher is not None and backend.batcher.batches < len(requests)
    await backend.close()


async def test_a_lone_request_goes_at_once_and_alone(kserve: Proc) -> None:
    backend = await _backend(kserve, "batch-echo", max_batch_rows=16)
    answer = await backend.infer(_echo(3, 1.0), None)
    assert answer.outputs["call_rows"].tolist() == [3, 3, 3]
    await backend.close()


async def test_batching_is_off_by_default(kserve: Proc) -> None:
    backend = await _backend(kserve, "batch-echo")
    answers = await asyncio.gather(*(backend.infer(_echo(1, i), None) for i in range(6)))
    assert backend.batcher is None
    assert [int(a.outputs["call_rows"][0]) for a in answers] == [1] * 6
    await backend.close()


async def test_requests_for_other_outputs_or_dtypes_do_not_share_a_call(kserve: Proc) -> None:
    backend = await _backend(kserve, "mixed", max_batch_rows=16)
    rng = np.random.default_rng(0)

    def mixed(rows: int, outputs: list[str] | None) -> InferRequest:
        return InferRequest("mixed", {"half": rng.random((rows, 2)).astype(np.float16),
                                      "byte": rng.integers(0, 100, (rows, 2), dtype=np.uint8),
                                      "long": rng.integers(-9, 9, (rows, 2), dtype=np.int64)},
                            requested_outputs=outputs)

    requests = [mixed(1 + i % 3, None if i % 2 else ["total", "long2"]) for i in range(12)]
    answers = await asyncio.gather(*(backend.infer(r, None) for r in requests))
    for request, answer in zip(requests, answers, strict=True):
        expected = ["half2", "byte2", "long2", "total"] if request.requested_outputs is None else ["total", "long2"]
        assert list(answer.outputs) == expected
        np.testing.assert_array_equal(answer.outputs["long2"], request.inputs["long"] * 2)
        total = sum(a.astype(np.float32).sum(1) for a in request.inputs.values())
        np.testing.assert_allclose(answer.outputs["total"], total, rtol=1e-3)
    await backend.close()


async def test_a_model_that_is_not_batch_major_is_never_batched(kserve: Proc) -> None:
    backend = await _backend(kserve, "slow", max_batch_rows=16)
    values = [0.05, 0.1, 0.15]
    answers = await asyncio.gather(*(backend.infer(InferRequest("slow", {"seconds": np.array([v], np.float32)}), None)
                                     for v in values))
    assert [float(a.outputs["seconds"][0]) for a in answers] == pytest.approx(values)
    assert backend.batcher is not None and backend.batcher.batches == 0
    await backend.close()


async def test_an_upstream_that_does_not_batch_fails_clearly(kserve: Proc) -> None:
    backend = await _backend(kserve, "first-row", max_batch_rows=16)
    request = InferRequest("first-row", {"x": np.ones((2, 2), np.float32)})
    with pytest.raises(GatewayError, match="answered output 'y' with shape \\[1, 2\\] for a batch of 2 rows"):
        await backend.infer(request, None)
    await backend.close()


async def test_each_caller_keeps_its_own_deadline(kserve: Proc) -> None:
    backend = await _backend(kserve, "batch-echo", max_batch_rows=16, max_batches_in_flight=1)
    blocker = asyncio.ensure_future(backend.infer(_echo(1, 0.0), None))  # 50 ms upstream
    await asyncio.sleep(0.01)
    now = time.monotonic()
    hurried, patient = await asyncio.gather(backend.infer(_echo(1, 1.0), now + 0.02),
                                            backend.infer(_echo(1, 2.0), now + 5.0), return_exceptions=True)
    assert isinstance(hurried, DeadlineExceeded)
    np.testing.assert_array_equal(patient.outputs["tripled"], np.full((1, 2), 6.0))
    await blocker
    await backend.close()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_batch_rows", 0, "must be an integer >= 1, got 0"),
    ("max_batch_rows", True, "must be an integer >= 1, got True"),
    ("max_batch_delay_ms", 5000, "must be a number of milliseconds in \\[0, 1000\\], got 5000"),
    ("max_batches_in_flight", 0, "must be an integer >= 1, got 0"),
    ("max_batches_in_flight", "2", "must be an integer >= 1, got '2'"),
])
def test_batching_params_are_checked(field: str, value: object, message: str) -> None:
    params = {"address": "127.0.0.1:1", field: value}
    with pytest.raises(ConfigError, match=f"models\\[0\\]\\.backend\\.params\\.{field}: {message}"):
        create_backend("m", ComponentConfig("upstream", params), "models[0].backend")


async def test_through_the_gateway_concurrent_clients_get_their_own_answers(make_gateway: GatewayFactory,
                                                                            kserve: Proc) -> None:
    """...and the rows per upstream call show in ``moat_backend_batch_rows``, as Prometheus scrapes it."""
    model = upstream_model("batch-echo", kserve.info["grpc_port"])
    model["backend"]["params"]["max_batch_rows"] = 32
    gateway = await make_gateway([model])
    client = stub(gateway.ports.grpc)

    async def ask(i: int) -> tuple[np.ndarray, pb.ModelInferResponse]:
        request = pb.ModelInferRequest(model_name="batch-echo", id=f"r{i}")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
        x = np.array([[i, -i]], np.float32)
        request.raw_input_contents.append(x.tobytes())
        return x, await client.ModelInfer(request, metadata=ALICE)

    answers = await asyncio.gather(*(ask(i) for i in range(16)))
    shared = 0
    for i, (x, reply) in enumerate(answers):
        assert reply.id == f"r{i}"
        names = [o.name for o in reply.outputs]
        tripled = np.frombuffer(reply.raw_output_contents[names.index("tripled")], np.float32).reshape(1, 2)
        np.testing.assert_array_equal(tripled, x * 3)
        shared += int(np.frombuffer(reply.raw_output_contents[names.index("call_rows")], np.int64)[0] > 1)
    assert shared > 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{gateway.ports.metrics}/metrics", timeout=5).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, s.labels.get("le")): s.value for s in families["moat_backend_batch_rows"].samples
               if s.labels.get("model") == "batch-echo" and s.labels.get("backend") == "upstream"}
    calls, rows = samples[("moat_backend_batch_rows_count", None)], samples[("moat_backend_batch_rows_sum", None)]
    assert rows == 16 and 1 <= calls < 16  # every row went upstream, in fewer calls than requests
    assert samples[("moat_backend_batch_rows_bucket", "1.0")] < calls  # some call carried more than one
