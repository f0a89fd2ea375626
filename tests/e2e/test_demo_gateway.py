"""The demo gateway through the stock tritonclient: answers, accuracy, statuses, metrics, admin CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from evaluation.data import load_fashion_mnist
from tests.e2e.conftest import ALICE, BOB, client, infer_input, write_config
from tests.servers.procs import REPO, Proc, start_gateway


def _images(n: int, seed: int = 0) -> np.ndarray:
    test = load_fashion_mnist("test")
    index = np.random.default_rng(seed).choice(len(test.labels), n, replace=False)
    return np.ascontiguousarray(test.images[index], dtype=np.float32)


def _refused(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value


def test_live_and_metadata_of_both_demo_models(demo: Proc) -> None:
    c = client(demo)
    assert c.is_server_live(headers=ALICE)
    assert c.is_model_ready("fashion-encoder", headers=BOB)
    for name, output, shape in (("fashion-classifier", "probabilities", [-1, 10]),
                                ("fashion-encoder", "embedding", [-1, 128])):
        meta = c.get_model_metadata(name, headers=ALICE)
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 1, 28, 28])]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [(output, "FP32", shape)]


def test_classifier_is_accurate_and_answers_probabilities(demo: Proc) -> None:
    test = load_fashion_mnist("test")
    c = client(demo)
    predictions = []
    for start in range(0, len(test.labels), 1000):
        batch = np.ascontiguousarray(test.images[start:start + 1000], dtype=np.float32)
        result = c.infer("fashion-classifier", [infer_input("input", batch, "FP32")], headers=ALICE)
        probabilities = result.as_numpy("probabilities")
        assert probabilities.shape == (len(batch), 10) and probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        predictions.append(probabilities.argmax(axis=1))
    accuracy = float((np.concatenate(predictions) == test.labels).mean())
    assert accuracy >= 0.85, f"demo classifier accuracy through the gateway is {accuracy:.3f}"


def test_encoder_answers_embeddings(demo: Proc) -> None:
    images = _images(16)
    result = client(demo).infer("fashion-encoder", [infer_input("input", images, "FP32")], headers=BOB)
    embedding = result.as_numpy("embedding")
    assert embedding.shape == (16, 128) and embedding.dtype == np.float32 and np.isfinite(embedding).all()
    again = client(demo).infer("fashion-encoder", [infer_input("input", images[:4], "FP32")], headers=BOB)
    np.testing.assert_allclose(again.as_numpy("embedding"), embedding[:4], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer demo-mallory-key"}, {"x-api-key": "x"}])
def test_missing_or_wrong_key_is_unauthenticated(demo: Proc, headers: dict) -> None:
    error = _refused(client(demo).infer, "fashion-classifier", [infer_input("input", _images(1), "FP32")],
                     headers=headers)
    assert error.status() == "StatusCode.UNAUTHENTICATED"


def test_unknown_model_is_not_found(demo: Proc) -> None:
    error = _refused(client(demo).infer, "fashion-regressor", [infer_input("input", _images(1), "FP32")],
                     headers=ALICE)
    assert error.status() == "StatusCode.NOT_FOUND" and "fashion-regressor" in error.message()


@pytest.mark.parametrize(
    ("name", "array", "datatype", "message"),
    [
        ("image", np.zeros((1, 1, 28, 28), np.float32), "FP32", "unexpected input 'image'"),
        ("input", np.zeros((1, 1, 28, 28), np.float64), "FP64", "input 'input': datatype FP64 does not match the model's FP32"),
        ("input", np.zeros((1, 28, 28), np.float32), "FP32", "input 'input': shape [1, 28, 28] does not match the model's [-1, 1, 28, 28]"),
        ("input", np.zeros((1, 1, 28, 28), np.uint8), "UINT8", "input 'input': datatype UINT8 does not match"),
    ],
)
def test_bad_tensors_are_invalid_argument_naming_the_tensor(demo: Proc, name, array, datatype, message) -> None:
    c = client(demo)
    error = _refused(c.infer, "fashion-classifier", [infer_input(name, array, datatype)], headers=ALICE)
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and message in error.message()
    assert c.infer("fashion-classifier", [infer_input("input", _images(2), "FP32")], headers=ALICE).as_numpy(
        "probabilities").shape == (2, 10)


def test_byte_count_mismatch_is_invalid_argument(demo: Proc) -> None:
    """tritonclient always sends consistent bytes, so this uses Triton's own generated stub."""
    channel = grpc.insecure_channel(f"127.0.0.1:{demo.info['grpc']}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = service_pb2.ModelInferRequest(model_name="fashion-classifier")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    request.raw_input_contents.append(b"\0" * 3000)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, metadata=tuple(ALICE.items()))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'input': raw content has 3000 bytes, shape [1, 1, 28, 28] of float32 needs 3136" in caught.value.details()
    channel.close()


def test_message_over_the_limit_is_resource_exhausted(tmp_path: Path) -> None:
    config = write_config(tmp_path / "small.yaml", max_message_bytes=1024 * 1024)
    proc = start_gateway(config, tmp_path)
    try:
        c = client(proc)
        big = np.zeros((400, 1, 28, 28), np.float32)  # 1.25 MB
        error = _refused(c.infer, "fashion-classifier", [infer_input("input", big, "FP32")], headers=ALICE)
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        ok = c.infer("fashion-classifier", [infer_input("input", _images(8), "FP32")], headers=ALICE)
        assert ok.as_numpy("probabilities").shape == (8, 10)
    finally:
        assert proc.stop() == 0


def test_metrics_and_admin_cli_show_the_requests_just_made(demo: Proc) -> None:
    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{demo.info['metrics']}/metrics", timeout=5).read().decode()

    def value(text: str, series: str) -> float:
        return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series + " ")), 0.0)

    ok_series = 'moat_requests_total{code="OK",model="fashion-encoder"}'
    before = scrape()
    c = client(demo)
    for _ in range(3):
        c.infer("fashion-encoder", [infer_input("input", _images(4), "FP32")], headers=BOB)
    after = scrape()
    assert value(after, ok_series) - value(before, ok_series) == 3
    duration = 'moat_request_duration_seconds_count{model="fashion-encoder"}'
    assert value(after, duration) - value(before, duration) == 3
    assert 'moat_backend_duration_seconds_bucket{backend="embedded",le="0.0001",model="fashion-encoder"}' in after
    assert "moat_request_size_bytes_sum" in after and 'moat_build_info{version="' in after
    admin = f"127.0.0.1:{demo.info['admin']}"
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "clients", "--admin", admin,
                             "--token", "demo-admin-token", "--json"], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    clients = {c["client_id"]: c for c in json.loads(result.stdout)["clients"]}
    assert set(clients) == {"alice", "bob"} and int(clients["bob"]["requests"]) >= 3
    denied = subprocess.run([sys.executable, "-m", "gateway.cli", "info", "--admin", admin, "--token", "wrong"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
