"""Watermark evidence over real gRPC: answers are watermarked and recorded, the evidence is
exported as a signed file, imported back, and a tampered file is refused naming the problem."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.admin_client import AdminClient
from gateway.evidence import EvidenceError, load_evidence
from protos import inference_pb2 as pb
from tests.integration.conftest import ALICE, GatewayFactory, embedded_model, stub


def _watermarked(torchscript: Path, **params: object) -> dict:
    model = embedded_model("tiny", torchscript)
    # A high rate so that a few hundred random 4x4 queries give dozens of records.
    model["watermark"] = {"name": "dawn", "params": {"rate": 0.2, "levels": 16, **params}}
    return model


async def _query(gateway, n: int, seed: int = 0) -> np.ndarray:
    images = np.random.default_rng(seed).random((n, 1, 4, 4), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype="FP32", shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    reply = await stub(gateway.ports.grpc).ModelInfer(request, metadata=ALICE)
    return np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(n, 3)


def _admin(gateway) -> AdminClient:
    return AdminClient(f"127.0.0.1:{gateway.ports.admin}", "admin-token")


async def test_export_import_round_trip_and_tamper(make_gateway: GatewayFactory, tiny_torchscript: Path,
                                                   tmp_path: Path) -> None:
    gateway = await make_gateway([_watermarked(tiny_torchscript)], state={"name": "memory"})
    answers = await _query(gateway, 400)
    with _admin(gateway) as admin:
        data = await asyncio.to_thread(admin.export_evidence, "alice")
        evidence = load_evidence(data)
        assert evidence.client == "alice" and evidence.model == "tiny" and evidence.watermark["name"] == "dawn"
        assert 40 < len(evidence.records) < 130  # r = 0.2 of 400 answers
        labels = np.array([r["label"] for r in evidence.records])
        sent = np.array([r["answer"] for r in evidence.records], np.float32)
        assert np.array_equal(sent.argmax(axis=1), labels)
        assert all(any(np.allclose(a, row) for row in answers) for a in sent)  # what was recorded was sent

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{gateway.ports.metrics}/metrics", timeout=5).read().decode()
        assert f'moat_watermarked_answers_total{{model="tiny"}} {len(labels)}.0' in metrics
        assert f'moat_evidence_records_total{{model="tiny"}} {len(labels)}.0' in metrics

        # Importing into a fresh gateway with the same secret restores the records.
        fresh = await make_gateway([_watermarked(tiny_torchscript)], state={"name": "memory"})
        with _admin(fresh) as other:
            assert await asyncio.to_thread(other.import_evidence, data) == {"client_id": "alice", "model": "tiny", "records": len(labels)}
            restored = load_evidence(await asyncio.to_thread(other.export_evidence, "alice", "tiny"))
        assert [r["query"] for r in restored.records] == [r["query"] for r in evidence.records]

        document = json.loads(data)
        document["records"][0]["label"] = (document["records"][0]["label"] + 1) % 3
        tampered = json.dumps(document).encode()
        with pytest.raises(grpc.RpcError) as caught:
            await asyncio.to_thread(admin.import_evidence, tampered)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "checksum mismatch" in caught.value.details()
        with pytest.raises(EvidenceError, match="checksum mismatch"):
            load_evidence(tampered)

        # Recomputing the SHA-256 after the edit does not help: the HMAC needs the server secret.
        import hashlib

        body = {k: v for k, v in document.items() if k not in ("sha256", "hmac")}
        document["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        with pytest.raises(grpc.RpcError) as caught:
            await asyncio.to_thread(admin.import_evidence, json.dumps(document).encode())
        assert "signature mismatch" in caught.value.details()


async def test_evidence_is_bounded_and_survives_reset(make_gateway: GatewayFactory, tiny_torchscript: Path) -> None:
    gateway = await make_gateway([_watermarked(tiny_torchscript, max_evidence=10)], state={"name": "memory"})
    await _query(gateway, 300)
    with _admin(gateway) as admin:
        assert len(load_evidence(await asyncio.to_thread(admin.export_evidence, "alice")).records) == 10
        await asyncio.to_thread(admin.reset, "alice")
        assert len(load_evidence(await asyncio.to_thread(admin.export_evidence, "alice")).records) == 10  # proof outlives a reset
        with pytest.raises(grpc.RpcError) as caught:
            await asyncio.to_thread(admin.export_evidence, "mallory")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{gateway.ports.metrics}/metrics", timeout=5).read().decode()
    assert 'moat_evidence_bound_reached_total{model="tiny"} 1.0' in metrics


async def test_bad_watermark_config_names_the_field(make_gateway: GatewayFactory, tiny_torchscript: Path) -> None:
    from contracts.params import ConfigError

    with pytest.raises(ConfigError, match=r"models\[0\]\.watermark\.params\.rate"):
        await make_gateway([_watermarked(tiny_torchscript, rate=2)])
