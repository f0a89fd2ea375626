"""The escalation policy end to end over gRPC: flag, throttle with a retry hint, block, and the
operator's unblock and reset, with alerts and metrics along the way."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import admin_pb2, admin_pb2_grpc
from protos import inference_pb2 as pb
from tests.integration.conftest import (
    ADMIN,
    ALICE,
    BOB,
    GatewayFactory,
    embedded_model,
    stub,
)


def _escalating_model(torchscript: Path) -> dict:
    model = embedded_model("tiny", torchscript)
    # 4 tables of 6 bits over the 16 raw pixels: one random image per request covers them in
    # tens of requests, so the client walks through flagged (18%), throttled (36%), blocked (57%).
    model["detectors"] = [{"name": "coverage", "params": {"tables": 4, "bits": 6, "alert_coverage": 60}}]
    model["defenses"] = [{"name": "rounding", "params": {"decimals": 2}}]
    model["policy"] = {"flag_at": 0.3, "throttle_at": 0.6, "throttle_per_second": 20, "block_at": 0.95}
    return model


def _request(rng: np.random.Generator, batch: int = 8) -> pb.ModelInferRequest:
    images = rng.random((batch, 1, 4, 4), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype="FP32", shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    return request


async def _client_state(admin: admin_pb2_grpc.MoatAdminStub, client: str) -> admin_pb2.ClientModelState:
    summary = await admin.GetClient(admin_pb2.ClientRequest(client_id=client), metadata=ADMIN)
    return summary.models[0]


async def test_escalation_unblock_and_reset(make_gateway: GatewayFactory, tiny_torchscript: Path) -> None:
    gateway = await make_gateway([_escalating_model(tiny_torchscript)], state={"name": "memory"})
    client = stub(gateway.ports.grpc)
    admin = admin_pb2_grpc.MoatAdminStub(grpc.aio.insecure_channel(f"127.0.0.1:{gateway.ports.admin}"))
    rng = np.random.default_rng(0)
    seen: list[grpc.StatusCode] = []
    retry_hints: list[str] = []
    for _ in range(400):
        try:
            reply = await client.ModelInfer(_request(rng, 1), metadata=BOB)
            probabilities = np.frombuffer(reply.raw_output_contents[0], np.float32)
            assert np.allclose(probabilities * 100, np.round(probabilities * 100), atol=1e-4)  # rounding applied
            seen.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            seen.append(error.code())
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                retry_hints += [v for k, v in error.trailing_metadata() if k == "retry-after-ms"]
                await asyncio.sleep(int(retry_hints[-1]) / 1000)
            elif error.code() == grpc.StatusCode.PERMISSION_DENIED:
                assert "blocked" in error.details()
                break
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in seen and retry_hints, seen
    assert seen[-1] == grpc.StatusCode.PERMISSION_DENIED, seen
    assert (await _client_state(admin, "bob")).status == "blocked"
    # alice is a different key: unaffected.
    assert (await client.ModelInfer(_request(rng, 1), metadata=ALICE)).outputs

    alerts = (await admin.ListAlerts(admin_pb2.ListAlertsRequest(), metadata=ADMIN)).alerts
    assert [(a.client_id, a.detector, a.action) for a in alerts] == [
        ("bob", "coverage", "flagged"), ("bob", "coverage", "throttled"), ("bob", "coverage", "blocked")]
    assert alerts[-1].figures["coverage"] >= 0.95 * 60

    text = urllib.request.urlopen(f"http://127.0.0.1:{gateway.ports.metrics}/metrics", timeout=5).read().decode()
    for series in ('moat_defense_actions_total{action="throttle",defense="policy",model="tiny"}',
                   'moat_defense_actions_total{action="block",defense="policy",model="tiny"}',
                   'moat_alerts_total{detector="coverage",model="tiny"} 3.0',
                   'moat_flagged_clients{model="tiny",status="blocked"} 1.0'):
        assert series in text, series

    changed = await admin.UnblockClient(admin_pb2.ClientRequest(client_id="bob"), metadata=ADMIN)
    assert changed.changed == 1
    await client.ModelInfer(_request(rng), metadata=BOB)  # exempt from escalation now
    assert (await _client_state(admin, "bob")).status == "flagged"

    await admin.ResetClient(admin_pb2.ClientRequest(client_id="bob"), metadata=ADMIN)
    state = await _client_state(admin, "bob")
    assert (state.status, state.queries, state.coverage) == ("ok", 0, 0.0)


async def test_admin_rejects_unknown_clients_and_bad_tokens(make_gateway: GatewayFactory, tiny_torchscript: Path) -> None:
    gateway = await make_gateway([_escalating_model(tiny_torchscript)])
    admin = admin_pb2_grpc.MoatAdminStub(grpc.aio.insecure_channel(f"127.0.0.1:{gateway.ports.admin}"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.GetClient(admin_pb2.ClientRequest(client_id="mallory"), metadata=ADMIN)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    stream = admin.StreamAlerts(admin_pb2.ListAlertsRequest(), metadata=ALICE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stream:
            pass
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_stream_alerts_delivers_new_alerts(make_gateway: GatewayFactory, tiny_torchscript: Path) -> None:
    gateway = await make_gateway([_escalating_model(tiny_torchscript)])
    admin = admin_pb2_grpc.MoatAdminStub(grpc.aio.insecure_channel(f"127.0.0.1:{gateway.ports.admin}"))
    stream = admin.StreamAlerts(admin_pb2.ListAlertsRequest(), metadata=ADMIN)
    client, rng = stub(gateway.ports.grpc), np.random.default_rng(1)

    async def attack() -> None:
        for _ in range(40):
            try:
                await client.ModelInfer(_request(rng), metadata=ALICE)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.5)

    task = asyncio.create_task(attack())
    alert = await asyncio.wait_for(stream.read(), timeout=30)
    stream.cancel()
    await task
    assert (alert.client_id, alert.detector, alert.model) == ("alice", "coverage", "tiny")


async def _walk(client, metadata, rng: np.random.Generator, requests: int) -> list[np.ndarray]:
    answers = []
    for _ in range(requests):
        reply = await client.ModelInfer(_request(rng, 1), metadata=metadata)
        answers.append(np.frombuffer(reply.raw_output_contents[0], np.float32))
    return answers


async def test_tiers_budget_trust_and_switch_off(make_gateway: GatewayFactory, tiny_torchscript: Path) -> None:
    """alice is standard; bob's tier 'premium' has twice the coverage budget and no rounding."""
    model = _escalating_model(tiny_torchscript)
    model["policy"] = {"flag_at": 1.0}
    tiers = {"premium": {"detectors": {"coverage": {"alert_coverage": 99}}, "defenses": {"rounding": False}}}
    gateway = await make_gateway([model], tiers=tiers)
    client = stub(gateway.ports.grpc)
    admin = admin_pb2_grpc.MoatAdminStub(grpc.aio.insecure_channel(f"127.0.0.1:{gateway.ports.admin}"))
    alice = await _walk(client, ALICE, np.random.default_rng(2), 90)
    bob = await _walk(client, BOB, np.random.default_rng(2), 90)
    alice_state, bob_state = await _client_state(admin, "alice"), await _client_state(admin, "bob")
    assert alice_state.coverage == pytest.approx(bob_state.coverage)  # same queries, same coverage
    assert alice_state.coverage >= 60 > 0
    assert (alice_state.status, bob_state.status) == ("flagged", "ok")
    assert all(np.allclose(a * 100, np.round(a * 100), atol=1e-4) for a in alice)
    assert not all(np.allclose(b * 100, np.round(b * 100), atol=1e-4) for b in bob)


async def test_trusted_tier_skips_detection_and_defenses(make_gateway: GatewayFactory, tiny_torchscript: Path) -> None:
    gateway = await make_gateway([_escalating_model(tiny_torchscript)], tiers={"premium": {"trusted": True}})
    client = stub(gateway.ports.grpc)
    admin = admin_pb2_grpc.MoatAdminStub(grpc.aio.insecure_channel(f"127.0.0.1:{gateway.ports.admin}"))
    answers = await _walk(client, BOB, np.random.default_rng(3), 120)  # far past the block threshold
    state = await _client_state(admin, "bob")
    assert (state.status, state.queries, state.coverage) == ("ok", 0, 0.0)
    assert not all(np.allclose(a * 100, np.round(a * 100), atol=1e-4) for a in answers)


@pytest.mark.parametrize(
    ("tiers", "field"),
    [
        ({"premium": {"detectors": {"coverage": {"alert_coverage": 0}}}},
         "tiers.premium.detectors.coverage.alert_coverage"),
        ({"premium": {"detectors": {"seat": {}}}}, "tiers.premium.detectors.seat"),
        ({"premium": {"policy": {"block_at": 3}}}, "tiers.premium.policy.block_at"),
        ({"premium": {"trusted": "yes"}}, "tiers.premium.trusted"),
        ({}, "client 'bob'.tier"),
    ],
)
async def test_bad_tiers_fail_at_start_naming_the_field(
    make_gateway: GatewayFactory, tiny_torchscript: Path, tiers: dict, field: str
) -> None:
    from contracts.params import ConfigError

    with pytest.raises(ConfigError) as caught:
        await make_gateway([_escalating_model(tiny_torchscript)], tiers=tiers)
    assert field in str(caught.value), caught.value


async def test_unexpected_errors_in_streams_become_internal_without_details(
        make_gateway: GatewayFactory, tiny_torchscript: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = await make_gateway([_escalating_model(tiny_torchscript)])

    def explode(*_: object) -> None:
        raise RuntimeError("secret store internals")

    monkeypatch.setattr(gateway.alerts, "read", explode)
    admin = admin_pb2_grpc.MoatAdminStub(grpc.aio.insecure_channel(f"127.0.0.1:{gateway.ports.admin}"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in admin.StreamAlerts(admin_pb2.ListAlertsRequest(), metadata=ADMIN):
            pass
    assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.INTERNAL, "internal error")


async def test_a_new_key_gets_unavailable_while_the_state_store_is_down(
        make_gateway: GatewayFactory, tiny_torchscript: Path, tmp_path: Path) -> None:
    """Admitting a key this replica has not seen reads its standing from the store: a store that
    went away is UNAVAILABLE (retryable), as for every other store call, not a generic INTERNAL."""
    from tests.servers.procs import start_redis

    redis_server = start_redis(tmp_path)
    try:
        state = {"name": "redis", "params": {"url": redis_server.info["url"], "socket_timeout": 1}}
        gateway = await make_gateway([_escalating_model(tiny_torchscript)], state=state)
        client = stub(gateway.ports.grpc)
        rng = np.random.default_rng(0)
        await client.ModelInfer(_request(rng, 1), metadata=ALICE)  # served while the store is up
        redis_server.stop()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.ModelInfer(_request(rng, 1), metadata=BOB)  # BOB's first request
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "state store is unavailable" in caught.value.details()
    finally:
        redis_server.stop()
