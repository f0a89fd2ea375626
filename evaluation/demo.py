"""`make demo`: start the gateway on the embedded default, talk to it with the stock tritonclient,
show the answers and the metrics they produced, then stop it.

Run from the repository root: ``python -m evaluation.demo``.
"""

from __future__ import annotations

import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from evaluation.data import load_fashion_mnist
from evaluation.endpoint import GatewayProcess, launch_gateway

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "deploy" / "configs" / "demo.yaml"
ALICE = {"authorization": "Bearer demo-alice-key"}


def _input(images: np.ndarray) -> list[triton.InferInput]:
    tensor = triton.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return [tensor]


def _classify(client: triton.InferenceServerClient, classes: tuple[str, ...]) -> None:
    test = load_fashion_mnist("test")
    result = client.infer("fashion-classifier", _input(test.images[:8]), headers=ALICE)
    probabilities = result.as_numpy("probabilities")
    print("\nfashion-classifier, 8 test images (as alice):")
    for label, row in zip(test.labels[:8], probabilities, strict=True):
        mark = "ok" if row.argmax() == label else "WRONG"
        print(f"  true {classes[label]:<12} predicted {classes[row.argmax()]:<12} p={row.max():.3f}  {mark}")
    correct = 0
    for start in range(0, 2000, 500):
        batch = client.infer("fashion-classifier", _input(test.images[start:start + 500]), headers=ALICE)
        correct += int((batch.as_numpy("probabilities").argmax(1) == test.labels[start:start + 500]).sum())
    print(f"  accuracy on 2,000 test images through the gateway: {correct / 2000:.1%}")


def _embed(client: triton.InferenceServerClient) -> None:
    test = load_fashion_mnist("test")
    shirts, boots = np.flatnonzero(test.labels == 6)[:2], np.flatnonzero(test.labels == 9)[:1]
    images = test.images[np.concatenate([shirts, boots])]
    embedding = client.infer("fashion-encoder", _input(images), headers=ALICE).as_numpy("embedding")
    unit = embedding / np.linalg.norm(embedding, axis=1, keepdims=True)
    print(f"\nfashion-encoder: embeddings of shape {embedding.shape}")
    print(f"  cosine(shirt, shirt) = {unit[0] @ unit[1]:.3f}   cosine(shirt, ankle boot) = {unit[0] @ unit[2]:.3f}")


def _refused(client: triton.InferenceServerClient) -> None:
    print("\nthe same call without an API key:")
    try:
        client.infer("fashion-classifier", _input(np.zeros((1, 1, 28, 28), np.float32)))
    except InferenceServerException as error:
        print(f"  refused: {error.status()}: {error.message()}")


def _metrics(gateway: GatewayProcess) -> None:
    url = f"http://127.0.0.1:{gateway.ports['metrics']}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    wanted = ("moat_requests_total", "moat_request_duration_seconds_count", "moat_request_duration_seconds_sum",
              "moat_backend_duration_seconds_sum")
    print(f"\nmetrics the session produced ({url}):")
    for line in text.splitlines():
        if line.startswith(wanted):
            print(f"  {line}")


def main() -> int:
    classes = load_fashion_mnist("test").classes
    with tempfile.TemporaryDirectory(prefix="moat-demo-") as workdir:
        print(f"starting: moat serve --config {CONFIG.relative_to(REPO)}")
        gateway = launch_gateway(CONFIG, Path(workdir) / "gateway.log", cwd=REPO)
        try:
            print(f"gateway listening: gRPC {gateway.address}, admin :{gateway.ports['admin']}, "
                  f"metrics :{gateway.ports['metrics']}")
            client = triton.InferenceServerClient(gateway.address)
            print(f"is_server_live: {client.is_server_live(headers=ALICE)}")
            _classify(client, classes)
            _embed(client)
            _refused(client)
            _metrics(gateway)
        finally:
            code = gateway.stop()
        print(f"\ngateway stopped (exit code {code}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
