"""The upstream backend against a real KServe server: deadlines, credentials, failures."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from gateway.backends import create_backend
from gateway.config import ComponentConfig
from gateway.errors import DeadlineExceeded, Unavailable
from gateway.types import InferRequest
from protos import inference_pb2 as pb
from tests.integration.conftest import ALICE, BOB, GatewayFactory, stub, upstream_model
from tests.servers.procs import Proc, free_port


def _spy_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="spy")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 1])
    request.raw_input_contents.append(np.zeros((2, 1), np.float32).tobytes())
    return request


def _credentials_seen(reply: pb.ModelInferResponse) -> list[int]:
    return np.frombuffer(reply.raw_output_contents[0], np.int64).tolist()


async def test_api_keys_never_reach_the_upstream(make_gateway: GatewayFactory, kserve: Proc) -> None:
    port = kserve.info["grpc_port"]
    # The spy does see credentials when they are sent to it, so a leak would show.
    direct = stub(port)
    assert _credentials_seen(await direct.ModelInfer(_spy_request(), metadata=ALICE)) == [1, 1]
    gateway = await make_gateway([upstream_model("spy", port)])
    through = stub(gateway.ports.grpc)
    for metadata in (ALICE, BOB):
        assert _credentials_seen(await through.ModelInfer(_spy_request(), metadata=metadata)) == [0, 0]


async def test_model_name_is_mapped_to_the_upstream_name(make_gateway: GatewayFactory, kserve: Proc) -> None:
    gateway = await make_gateway([upstream_model("public-name", kserve.info["grpc_port"], "tiny-classifier")])
    request = pb.ModelInferRequest(model_name="public-name")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    reply = await stub(gateway.ports.grpc).ModelInfer(request, metadata=ALICE)
    assert reply.model_name == "public-name" and reply.outputs[0].name == "probabilities"


async def test_deadline_is_propagated_to_the_upstream_call(kserve: Proc) -> None:
    backend = create_backend("slow", ComponentConfig("upstream", {"address": f"127.0.0.1:{kserve.info['grpc_port']}"}),
                             "models[0].backend")
    await backend.start()
    request = InferRequest("slow", {"seconds": np.array([3.0], np.float32)})
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await backend.infer(request, deadline=started + 0.3)
    assert time.monotonic() - started < 2.0, "the upstream call outlived the caller's deadline"
    await backend.close()


async def test_client_deadline_through_the_gateway(make_gateway: GatewayFactory, kserve: Proc) -> None:
    gateway = await make_gateway([upstream_model("slow", kserve.info["grpc_port"])])
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="seconds", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.array([3.0], np.float32).tobytes())
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(gateway.ports.grpc).ModelInfer(request, metadata=ALICE, timeout=0.4)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0


async def test_upstream_not_listening_is_unavailable(make_gateway: GatewayFactory) -> None:
    backend = create_backend("m", ComponentConfig("upstream", {"address": f"127.0.0.1:{free_port()}"}),
                             "models[0].backend")
    await backend.start()
    with pytest.raises(Unavailable):
        await backend.metadata()
    assert not await backend.ready()
    await backend.close()
    gateway = await make_gateway([upstream_model("tiny-classifier", free_port())])
    client = stub(gateway.ports.grpc)
    request = pb.ModelInferRequest(model_name="tiny-classifier")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.ModelInfer(request, metadata=ALICE)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1" not in caught.value.details()
    assert (await client.ServerLive(pb.ServerLiveRequest(), metadata=ALICE)).live
    assert not (await client.ServerReady(pb.ServerReadyRequest(), metadata=ALICE)).ready


@pytest.mark.parametrize(
    ("upstream_code", "code", "details"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT, "upstream: bad shape"),
        (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND, "upstream: bad shape"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DEADLINE_EXCEEDED, "upstream did not answer before the deadline"),
        (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, "upstream model server is unavailable"),
        (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE, "upstream model server is unavailable"),
        (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE, "upstream model server is unavailable"),
    ],
)
def test_upstream_statuses_are_relayed_or_hidden(upstream_code, code, details) -> None:
    """Request problems keep their code and message; server-side failures show no internals."""
    from grpc.aio import Metadata

    from gateway.backends.upstream import _upstream_error

    error = _upstream_error(grpc.aio.AioRpcError(upstream_code, Metadata(), Metadata(), details="bad shape"))
    assert (error.code, error.reason) == (code.name, details)
