"""Deferred detection over real gRPC: a small request is answered with the standing its predecessors
left and detected right after; a batch larger than ``server.deferred_max_rows`` is judged before
its answer; ``deferred_max_rows: 0`` detects every request first. A small request's queries are
pooled for its defenses while its model runs."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from protos import admin_pb2, admin_pb2_grpc
from protos import inference_pb2 as pb
from tests.integration.conftest import (
    ADMIN,
    ALICE,
    GatewayFactory,
    embedded_model,
    stub,
)


def _flagging_model(torchscript: Path) -> dict:
    model = embedded_model("tiny", torchscript)
    # Random images cover 4 tables of 6 bits over the 16 pixels fast: flagged within tens of rows.
    model["detectors"] = [{"name": "coverage", "params": {"tables": 4, "bits": 6, "alert_coverage": 30}}]
    # Flagged clients get wrong labels; unflagged ones the clean answer.
    model["defenses"] = [{"name": "misinformation", "params": {"unflagged": "off"}}]
    model["policy"] = {"flag_at": 1.0}
    return model


def _request(images: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype="FP32", shape=images.shape)
    request.raw_input_contents.append(images.astype(np.float32).tobytes())
    return request


async def _answer(client, images: np.ndarray) -> np.ndarray:
    reply = await client.ModelInfer(_request(images), metadata=ALICE)
    return np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(len(images), -1)


async def _status(admin: admin_pb2_grpc.MoatAdminStub) -> str:
    summary = await admin.GetClient(admin_pb2.ClientRequest(client_id="alice"), metadata=ADMIN)
    return summary.models[0].status


def _clean_labels(torchscript: Path, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.jit.load(str(torchscript))(torch.from_numpy(images)).argmax(1).numpy()


@pytest.mark.parametrize("deferred_max_rows", [64, 0])
async def test_the_request_that_flags_a_client(make_gateway: GatewayFactory, tiny_torchscript: Path,
                                               deferred_max_rows: int) -> None:
    gateway = await make_gateway([_flagging_model(tiny_torchscript)], state={"name": "memory"},
                                 deferred_max_rows=deferred_max_rows)
    client = stub(gateway.ports.grpc)
    admin = admin_pb2_grpc.MoatAdminStub(grpc.aio.insecure_channel(f"127.0.0.1:{gateway.ports.admin}"))
    images = np.random.default_rng(0).random((300, 1, 4, 4), dtype=np.float32)
    clean = _clean_labels(tiny_torchscript, images)
    for i, image in enumerate(images):
        labels = (await _answer(client, image[None])).argmax(1)
        if await _status(admin) == "flagged":  # GetClient waits for this request's detection
            break
    else:
        pytest.fail("the client was never flagged")
    assert i > 5
    # Deferred: the request that crossed the threshold was answered before its own detection (clean);
    # inline (0): it was judged first and got a wrong label.
    assert (labels[0] == clean[i]) == (deferred_max_rows > 0)
    # Either way, every later answer is defended.
    later = (await _answer(client, images[i + 1:i + 21])).argmax(1)
    assert np.all(later != clean[i + 1:i + 21])


async def test_a_batch_above_the_deferred_bound_is_judged_before_its_answer(
        make_gateway: GatewayFactory, tiny_torchscript: Path) -> None:
    gateway = await make_gateway([_flagging_model(tiny_torchscript)], state={"name": "memory"},
                                 deferred_max_rows=8)
    client = stub(gateway.ports.grpc)
    admin = admin_pb2_grpc.MoatAdminStub(grpc.aio.insecure_channel(f"127.0.0.1:{gateway.ports.admin}"))
    images = np.random.default_rng(1).random((200, 1, 4, 4), dtype=np.float32)
    # A fresh key's first request: one big batch that covers enough to be flagged on its own.
    labels = (await _answer(client, images)).argmax(1)
    assert await _status(admin) == "flagged"
    assert np.mean(labels != _clean_labels(tiny_torchscript, images)) == 1.0


async def test_a_small_request_is_defended_with_its_queries_pooled_while_the_model_ran(
        make_gateway: GatewayFactory, tiny_torchscript: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pooling a request's queries for the defenses (``ModelProtection.pool_queries``) happens while
    its model computes the answer, and that answer is defended with them; a batch above
    ``deferred_max_rows``, defended after inline detection, pools them itself."""
    from defenses.codes import coarse_grid
    from gateway.pipeline import DataPlane
    from gateway.protection import ModelProtection

    events: list[tuple[str, object]] = []
    pool_queries, defend, protect = ModelProtection.pool_queries, ModelProtection.defend, DataPlane._protect

    def pooling(self, caller, inputs):  # type: ignore[no-untyped-def]
        pooled = pool_queries(self, caller, inputs)
        events.append(("pooled", pooled))
        return pooled

    def defending(self, caller, batch, snapshot, pooled=None):  # type: ignore[no-untyped-def]
        events.append(("defend", pooled))
        if pooled is not None:
            np.testing.assert_array_equal(pooled.grid, coarse_grid(batch.inputs))
        return defend(self, caller, batch, snapshot, pooled)

    async def protecting(self, *args):  # type: ignore[no-untyped-def]
        events.append(("answered", None))  # the model's answer is in: the protect stage starts
        return await protect(self, *args)

    monkeypatch.setattr(ModelProtection, "pool_queries", pooling)
    monkeypatch.setattr(ModelProtection, "defend", defending)
    monkeypatch.setattr(DataPlane, "_protect", protecting)
    model = embedded_model("tiny", tiny_torchscript)
    model["watermark"] = {"name": "dawn", "params": {"rate": 0.5}}  # codes every answer's queries
    gateway = await make_gateway([model], state={"name": "memory"}, deferred_max_rows=8)
    client = stub(gateway.ports.grpc)
    images = np.random.default_rng(2).random((40, 1, 4, 4), dtype=np.float32)
    for image in images[:20]:
        await _answer(client, image[None])
    small = events[:]
    assert [kind for kind, _ in small] == ["pooled", "answered", "defend"] * 20
    assert all(small[i][1] is not None and small[i + 2][1] is small[i][1] for i in range(0, 60, 3))
    events.clear()
    await _answer(client, images[20:])  # 20 rows > deferred_max_rows: defended after detection
    assert events == [("answered", None), ("defend", None)]
