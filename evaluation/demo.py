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
import yaml
from tqdm import tqdm
from tritonclient.utils import InferenceServerException

from defenses.b4b import B4B
from evaluation.data import load_fashion_mnist
from evaluation.endpoint import GatewayProcess, launch_gateway
from gateway.admin_client import AdminClient

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


def _thief_and_honest(client: triton.InferenceServerClient, admin: AdminClient) -> None:
    train = load_fashion_mnist("train")
    rng = np.random.default_rng(0)
    thief = train.images[rng.choice(len(train.labels), 10_000, replace=False)]
    footwear = train.images[rng.choice(np.flatnonzero(np.isin(train.labels, [7, 9])), 10_000, replace=False)]
    print("\nfashion-encoder under B4B: bob steals (10,000 images of every class), alice tells sneakers")
    print("from ankle boots (10,000 images of those two classes):")
    for who, images in (("bob", thief), ("alice", footwear)):
        headers = {"authorization": f"Bearer demo-{who}-key"}
        for start in tqdm(range(0, len(images), 500), desc=f"  {who:5}", leave=False, disable=None):
            client.infer("fashion-encoder", _input(images[start:start + 500]), headers=headers)
    b4b = next(d for d in _encoder_config()["defenses"] if d["name"] == "b4b")
    cost = B4B(b4b["params"], kind="encoder", secret=b"only-sigma-is-needed-here")
    for summary in admin.list_clients()["clients"]:
        state = next(m for m in summary["models"] if m["model"] == "fashion-encoder")
        print(f"  {summary['client_id']:5}  coverage {state['coverage']:5.1f}%  noise sigma {cost.sigma(state['coverage']):.4f}"
              f"  status {state['status']}")
    print("\nalerts (moat alerts):")
    for alert in admin.list_alerts()["alerts"]:
        print(f"  #{alert['id']} {alert['client_id']} on {alert['model']}: {alert['detector']} "
              f"coverage={alert['figures'].get('coverage', 0):.1f}% -> {alert['action']}")


def _encoder_config() -> dict:
    models = yaml.safe_load(CONFIG.read_text())["models"]
    return next(m for m in models if m["name"] == "fashion-encoder")


def _metrics(gateway: GatewayProcess) -> None:
    url = f"http://127.0.0.1:{gateway.ports['metrics']}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    wanted = ("moat_requests_total", "moat_request_duration_seconds_sum", "moat_alerts_total",
              "moat_flagged_clients", "moat_defense_actions_total")
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
            with AdminClient(f"127.0.0.1:{gateway.ports['admin']}", "demo-admin-token") as admin:
                for who in ("alice", "bob"):
                    admin.reset(who)  # the demo's state persists in .cache/state: start afresh
                _thief_and_honest(client, admin)
            _metrics(gateway)
        finally:
            code = gateway.stop()
        print(f"\ngateway stopped (exit code {code}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
