"""The gateway over real gRPC with moat's own stubs: statuses, codecs, limits, health, admin, metrics."""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import admin_pb2, admin_pb2_grpc, inference_pb2_grpc
from protos import inference_pb2 as pb
from tests.integration.conftest import (
    ADMIN,
    ALICE,
    BOB,
    GatewayFactory,
    embedded_model,
    stub,
    upstream_model,
)
from tests.servers.procs import Proc


def _image_request(batch: int = 2, model: str = "tiny", seed: int = 0) -> pb.ModelInferRequest:
    images = np.random.default_rng(seed).random((batch, 1, 4, 4), dtype=np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    return request


def _probabilities(reply: pb.ModelInferResponse) -> np.ndarray:
    assert reply.outputs[0].name == "probabilities" and reply.outputs[0].datatype == "FP32"
    return np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(tuple(reply.outputs[0].shape))


async def _status(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


@pytest.fixture
async def tiny(make_gateway: GatewayFactory, tiny_torchscript: Path, kserve: Proc):
    return await make_gateway([embedded_model("tiny", tiny_torchscript),
                               upstream_model("mixed", kserve.info["grpc_port"])])


async def test_infer_answers_with_declared_outputs_and_echoes_id(tiny) -> None:
    request = _image_request(batch=3)
    request.id = "abc-1"
    reply = await stub(tiny.ports.grpc).ModelInfer(request, metadata=ALICE)
    probabilities = _probabilities(reply)
    assert probabilities.shape == (3, 3) and reply.id == "abc-1" and reply.model_name == "tiny"
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


async def test_typed_contents_give_the_same_answer_as_raw(tiny) -> None:
    raw = _image_request(batch=2)
    typed = pb.ModelInferRequest(model_name="tiny")
    tensor = typed.inputs.add(name="input", datatype="FP32", shape=[2, 1, 4, 4])
    tensor.contents.fp32_contents.extend(np.frombuffer(raw.raw_input_contents[0], np.float32).tolist())
    client = stub(tiny.ports.grpc)
    np.testing.assert_array_equal(_probabilities(await client.ModelInfer(typed, metadata=ALICE)),
                                  _probabilities(await client.ModelInfer(raw, metadata=ALICE)))


async def test_fp16_uint8_int64_cross_to_upstream_exactly(tiny) -> None:
    request = pb.ModelInferRequest(model_name="mixed")
    request.inputs.add(name="half", datatype="FP16", shape=[1, 2])
    request.raw_input_contents.append(np.array([[0.5, 1.5]], np.float16).tobytes())
    request.inputs.add(name="byte", datatype="UINT8", shape=[1, 2])
    request.raw_input_contents.append(np.array([[7, 100]], np.uint8).tobytes())
    request.inputs.add(name="long", datatype="INT64", shape=[1, 2])
    request.raw_input_contents.append(np.array([[-3, 2**40]], np.int64).tobytes())
    reply = await stub(tiny.ports.grpc).ModelInfer(request, metadata=ALICE)
    outputs = {o.name: (o.datatype, list(o.shape)) for o in reply.outputs}
    assert outputs == {"half2": ("FP16", [1, 2]), "byte2": ("UINT8", [1, 2]), "long2": ("INT64", [1, 2]),
                       "total": ("FP32", [1])}
    assert np.frombuffer(reply.raw_output_contents[1], np.uint8).tolist() == [14, 200]
    assert np.frombuffer(reply.raw_output_contents[2], np.int64).tolist() == [-6, 2**41]


async def test_requested_outputs_are_the_only_ones_returned(tiny) -> None:
    request = pb.ModelInferRequest(model_name="mixed")
    for name, datatype, array in (("half", "FP16", np.ones((1, 2), np.float16)),
                                  ("byte", "UINT8", np.ones((1, 2), np.uint8)),
                                  ("long", "INT64", np.ones((1, 2), np.int64))):
        request.inputs.add(name=name, datatype=datatype, shape=[1, 2])
        request.raw_input_contents.append(array.tobytes())
    request.outputs.add(name="total")
    reply = await stub(tiny.ports.grpc).ModelInfer(request, metadata=ALICE)
    assert [o.name for o in reply.outputs] == ["total"]
    assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [6.0]


def _renamed(request: pb.ModelInferRequest, **changes) -> pb.ModelInferRequest:
    for key, value in changes.items():
        if key == "raw":
            request.raw_input_contents[0] = value
        elif key == "shape":
            del request.inputs[0].shape[:]
            request.inputs[0].shape.extend(value)
        else:
            setattr(request.inputs[0], key, value)
    return request


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (_renamed(_image_request(), name="image"), grpc.StatusCode.INVALID_ARGUMENT, "unexpected input 'image'"),
        (_renamed(_image_request(), datatype="FP64"), grpc.StatusCode.INVALID_ARGUMENT, "input 'input': raw content has 128 bytes"),
        (_renamed(_image_request(), datatype="INT32"), grpc.StatusCode.INVALID_ARGUMENT, "input 'input': datatype INT32 does not match the model's FP32"),
        (_renamed(_image_request(), shape=[2, 16], raw=b"\0" * 128), grpc.StatusCode.INVALID_ARGUMENT, r"input 'input': shape \[2, 16\] does not match"),
        (_renamed(_image_request(), raw=b"\0" * 100), grpc.StatusCode.INVALID_ARGUMENT, "input 'input': raw content has 100 bytes, shape .* needs 128"),
        (_image_request(model="resnet-9000"), grpc.StatusCode.NOT_FOUND, "unknown model 'resnet-9000'; served: mixed, tiny"),
    ],
)
async def test_bad_requests_get_precise_statuses_and_the_next_request_succeeds(
    tiny, request_: pb.ModelInferRequest, code: grpc.StatusCode, message: str
) -> None:
    client = stub(tiny.ports.grpc)
    error = await _status(client.ModelInfer(request_, metadata=ALICE))
    assert error.code() == code
    assert re.search(message, error.details()), error.details()
    assert _probabilities(await client.ModelInfer(_image_request(), metadata=ALICE)).shape == (2, 3)


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer nope"),), (("x-api-key", ""),)])
async def test_missing_or_wrong_key_is_unauthenticated_on_every_rpc(tiny, metadata) -> None:
    client = stub(tiny.ports.grpc)
    for call in (client.ModelInfer(_image_request(), metadata=metadata),
                 client.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), metadata=metadata),
                 client.ServerLive(pb.ServerLiveRequest(), metadata=metadata)):
        assert (await _status(call)).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_metadata_and_readiness(tiny) -> None:
    client = stub(tiny.ports.grpc)
    meta = await client.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), metadata=ALICE)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 1, 4, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("probabilities", "FP32", [-1, 3])]
    upstream_meta = await client.ModelMetadata(pb.ModelMetadataRequest(name="mixed"), metadata=BOB)
    assert [t.name for t in upstream_meta.inputs] == ["half", "byte", "long"]
    assert (await client.ServerLive(pb.ServerLiveRequest(), metadata=ALICE)).live
    assert (await client.ServerReady(pb.ServerReadyRequest(), metadata=ALICE)).ready
    assert (await client.ModelReady(pb.ModelReadyRequest(name="mixed"), metadata=ALICE)).ready
    server = await client.ServerMetadata(pb.ServerMetadataRequest(), metadata=ALICE)
    assert server.name == "moat"
    error = await _status(client.ModelMetadata(pb.ModelMetadataRequest(name="tiny", version="7"), metadata=ALICE))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "no version '7'" in error.details()
    # A caller's long strings are not echoed back (issue 26): the details stay short.
    error = await _status(client.ModelMetadata(pb.ModelMetadataRequest(name="x" * 100_000), metadata=ALICE))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "unknown model of 100000 characters" in error.details()
    assert len(error.details()) < 300
    error = await _status(client.ModelMetadata(pb.ModelMetadataRequest(name="tiny", version="7" * 100_000),
                                               metadata=ALICE))
    assert error.code() == grpc.StatusCode.NOT_FOUND and len(error.details()) < 300


async def test_message_over_the_limit_is_resource_exhausted(make_gateway: GatewayFactory, tiny_torchscript: Path) -> None:
    gateway = await make_gateway([embedded_model("tiny", tiny_torchscript)], max_message_bytes=64 * 1024)
    client = stub(gateway.ports.grpc)
    big = _image_request(batch=2000)  # 128 KB of pixels
    assert (await _status(client.ModelInfer(big, metadata=ALICE))).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _probabilities(await client.ModelInfer(_image_request(), metadata=ALICE)).shape == (2, 3)


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


async def test_admin_and_metrics_listen_only_on_their_own_addresses(make_gateway: GatewayFactory,
                                                                   tiny_torchscript: Path) -> None:
    """Issue 26: publishing the public port publishes neither the admin service nor /metrics.
    (Every 127.x.y.z address is loopback on Linux, so three of them stand for three interfaces.)"""
    gateway = await make_gateway([embedded_model("tiny", tiny_torchscript)], host="127.0.0.1",
                                 admin_host="127.0.0.2", metrics_host="127.0.0.3")
    ports = gateway.ports
    assert _accepts("127.0.0.1", ports.grpc)
    assert _accepts("127.0.0.2", ports.admin) and not _accepts("127.0.0.1", ports.admin)
    assert _accepts("127.0.0.3", ports.metrics) and not _accepts("127.0.0.1", ports.metrics)
    assert not _accepts("127.0.0.2", ports.grpc) and not _accepts("127.0.0.3", ports.grpc)


def test_admin_and_metrics_default_to_loopback_whatever_the_public_host() -> None:
    from gateway.config import ServerConfig

    defaults = ServerConfig(host="0.0.0.0")
    assert (defaults.admin_host, defaults.metrics_host) == ("127.0.0.1", "127.0.0.1")


async def test_gateway_runs_numpy_blas_on_one_thread(make_gateway: GatewayFactory, tiny_torchscript: Path) -> None:
    """Detectors make one-row products: OpenBLAS threads would only spin on the host's cores."""
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):  # as a fresh process has them on two cores
        await make_gateway([embedded_model("tiny", tiny_torchscript)])
        blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert blas and set(blas) == {1}


def test_freezing_the_startup_heap_takes_its_objects_out_of_collections() -> None:
    import gc

    from gateway.server import freeze_startup_heap

    started = [{"config": i} for i in range(1000)]  # what a gateway holds once started
    before = gc.get_freeze_count()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= before + len(started)
        assert all(len(gc.get_objects(generation)) < gc.get_freeze_count() for generation in range(3))
    finally:
        gc.unfreeze()


async def test_unexpected_errors_become_internal_without_details(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = tiny.plane.models["tiny"].backend

    def explode(arrays):
        raise RuntimeError("secret detector internals")

    monkeypatch.setattr(backend, "_run", explode)
    error = await _status(stub(tiny.ports.grpc).ModelInfer(_image_request(), metadata=ALICE))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error"


async def test_health_and_reflection(tiny) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{tiny.ports.grpc}")
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    async for reply in replies:
        names = {s.name for s in reply.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        break


async def test_admin_requires_the_token_and_reports_traffic(tiny) -> None:
    client = stub(tiny.ports.grpc)
    for _ in range(3):
        await client.ModelInfer(_image_request(), metadata=ALICE)
    await _status(client.ModelInfer(_image_request(model="nope"), metadata=ALICE))
    admin = admin_pb2_grpc.MoatAdminStub(grpc.aio.insecure_channel(f"127.0.0.1:{tiny.ports.admin}"))
    for metadata in ((), ALICE):
        error = await _status(admin.ListClients(admin_pb2.ListClientsRequest(), metadata=metadata))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    clients = {c.client_id: c for c in (await admin.ListClients(admin_pb2.ListClientsRequest(), metadata=ADMIN)).clients}
    assert (clients["alice"].requests, clients["alice"].errors) == (3, 1)
    assert (clients["bob"].requests, clients["bob"].tier) == (0, "premium")
    info = await admin.GetServerInfo(admin_pb2.GetServerInfoRequest(), metadata=ADMIN)
    assert [(m.name, m.backend, m.ready) for m in info.models] == [("mixed", "upstream", True), ("tiny", "embedded", True)]


async def test_metrics_endpoint_shows_the_requests_just_made(tiny) -> None:
    client = stub(tiny.ports.grpc)
    for _ in range(2):
        await client.ModelInfer(_image_request(), metadata=ALICE)
    await _status(client.ModelInfer(_renamed(_image_request(), name="x"), metadata=ALICE))
    await _status(client.ModelInfer(_image_request(model="probe-1"), metadata=ALICE))
    text = urllib.request.urlopen(f"http://127.0.0.1:{tiny.ports.metrics}/metrics", timeout=5).read().decode()
    assert 'moat_requests_total{code="OK",model="tiny"} 2.0' in text
    assert 'moat_requests_total{code="INVALID_ARGUMENT",model="tiny"} 1.0' in text
    assert 'moat_requests_total{code="NOT_FOUND",model="_unknown"} 1.0' in text
    assert 'moat_request_duration_seconds_count{model="tiny"} 3.0' in text
    assert 'moat_backend_duration_seconds_count{backend="embedded",model="tiny"} 2.0' in text
    assert 'moat_request_size_bytes_count{model="tiny"} 3.0' in text
    assert "probe-1" not in text


async def test_tls_and_mutual_tls(make_gateway: GatewayFactory, tiny_torchscript: Path, certificates) -> None:
    c = certificates
    tls = {"cert_file": str(c["server_pem"]), "key_file": str(c["server_key"]), "client_ca_file": str(c["ca_pem"])}
    gateway = await make_gateway([embedded_model("tiny", tiny_torchscript)], tls=tls)
    address = f"localhost:{gateway.ports.grpc}"
    with_cert = grpc.ssl_channel_credentials(c["ca_pem"].read_bytes(), c["client_key"].read_bytes(),
                                             c["client_pem"].read_bytes())
    client = inference_pb2_grpc.GRPCInferenceServiceStub(grpc.aio.secure_channel(address, with_cert))
    assert _probabilities(await client.ModelInfer(_image_request(), metadata=ALICE)).shape == (2, 3)
    without_cert = inference_pb2_grpc.GRPCInferenceServiceStub(grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(c["ca_pem"].read_bytes())))
    assert (await _status(without_cert.ModelInfer(_image_request(), metadata=ALICE, timeout=5))).code() == grpc.StatusCode.UNAVAILABLE
    plaintext = stub(gateway.ports.grpc)
    assert (await _status(plaintext.ModelInfer(_image_request(), metadata=ALICE, timeout=5))).code() == grpc.StatusCode.UNAVAILABLE



async def test_admin_client_speaks_tls_and_mutual_tls(make_gateway: GatewayFactory, tiny_torchscript: Path,
                                                     certificates) -> None:
    """Issue 26: the admin CLI and client reach a gateway whose admin port requires TLS client
    certificates; without them, or in plaintext, they are refused."""
    import asyncio
    import sys

    from gateway.admin_client import AdminClient

    c = certificates
    tls = {"cert_file": str(c["server_pem"]), "key_file": str(c["server_key"]), "client_ca_file": str(c["ca_pem"])}
    gateway = await make_gateway([embedded_model("tiny", tiny_torchscript)], tls=tls)
    address = f"localhost:{gateway.ports.admin}"
    mutual = {"ca_file": str(c["ca_pem"]), "cert_file": str(c["client_pem"]), "key_file": str(c["client_key"])}

    def info(**files: str) -> dict:
        with AdminClient(address, "admin-token", timeout=5, **files) as admin:
            return admin.server_info()

    assert [m["name"] for m in (await asyncio.to_thread(info, **mutual))["models"]] == ["tiny"]
    for files in ({"ca_file": mutual["ca_file"]}, {}):  # no client certificate; plaintext
        with pytest.raises(grpc.RpcError):
            await asyncio.to_thread(info, **files)
    flags = [f"--{name.replace('_', '-')}={path}" for name, path in mutual.items()]
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "info", "--admin", address, "--token", "admin-token", "--json", *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await cli.communicate()
    assert cli.returncode == 0, err.decode()
    assert '"tiny"' in out.decode()
    half = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "info", "--admin", address, flags[0], flags[1],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await half.communicate()
    assert half.returncode == 2 and "--cert-file and --key-file go together" in err.decode()
