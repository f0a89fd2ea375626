"""PRADA and misinformation on the demo classifier through the gateway: a JBDA-style synthetic
stream is flagged and then answered with wrong labels; natural traffic is neither, even when the
client sends some of its images again."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from evaluation.data import load_fashion_mnist
from evaluation.zoo import load_victim
from tests.e2e.conftest import admin_client, model_state, protected_config, query
from tests.servers.procs import Proc, start_gateway

CLASSIFIER = "fashion-classifier"


def jbda_stream(seed: np.ndarray, rounds: int = 3, step: float = 0.1) -> list[np.ndarray]:
    """Papernot et al. 2017 Jacobian augmentation: each round adds x + step·sign(∇x F[ŷ](x)) for every
    x so far. The thief would use its substitute's gradients; the victim's stand in for them here.
    Returns the batches to query, float32 [n, 1, 28, 28] each: the seed, then each round's new points."""
    model = load_victim(CLASSIFIER)
    points, batches = torch.from_numpy(seed), [seed]
    for _ in range(rounds):
        x = points.clone().requires_grad_(True)
        probabilities = model(x)
        chosen = probabilities.gather(1, probabilities.argmax(1, keepdim=True)).sum()
        (gradient,) = torch.autograd.grad(chosen, x)
        new = (points + step * gradient.sign()).clamp(0, 1).detach()
        batches.append(new.numpy())
        points = torch.cat([points, new])
    return batches


def _clean_predictions(images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return load_victim(CLASSIFIER)(torch.from_numpy(np.ascontiguousarray(images))).argmax(1).numpy()


def _alerts_metric(proc: Proc, detector: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{proc.info['metrics']}/metrics", timeout=5).read().decode()
    series = f'moat_alerts_total{{detector="{detector}",model="{CLASSIFIER}"}} '
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(series)), 0.0)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    work = tmp_path_factory.mktemp("classifier")
    # Detection and defenses only: the watermark's own cost to honest users (r = 0.5% of answers
    # relabelled) is measured in test_watermark_classifier.py.
    config = protected_config(work / "classifier.yaml", {"name": "sqlite", "params": {"path": str(work / "s.db")}},
                              models=[CLASSIFIER], edit=lambda data: data["models"][0].pop("watermark", None))
    proc = start_gateway(config, work)
    yield proc
    assert proc.stop() == 0


def test_natural_traffic_is_not_flagged_and_keeps_its_accuracy(gateway: Proc) -> None:
    test = load_fashion_mnist("test")
    images, labels = test.images[:5000], test.labels[:5000]
    answers = query(gateway, CLASSIFIER, "frank", images, batch=100)
    state = model_state(gateway, "frank", CLASSIFIER)
    assert state["status"] == "ok", state
    assert state["figures"]["prada.shapiro_w"] >= 0.9, state["figures"]
    through_gateway = float((answers.argmax(1) == labels).mean())
    clean = float((_clean_predictions(images) == labels).mean())
    assert through_gateway >= clean - 0.005, (through_gateway, clean)


def test_a_client_resending_its_images_is_not_flagged_and_keeps_its_accuracy(gateway: Proc) -> None:
    """Issue 24: 300 test images, then the first 2,000 of the same set (the 300 again among them)."""
    test = load_fashion_mnist("test")
    images = np.concatenate([test.images[7000:7300], test.images[7000:9000]])
    labels = np.concatenate([test.labels[7000:7300], test.labels[7000:9000]])
    answers = query(gateway, CLASSIFIER, "grace", images, batch=100)
    state = model_state(gateway, "grace", CLASSIFIER)
    assert state["status"] == "ok", state
    assert state["figures"]["prada.shapiro_w"] >= 0.9, state["figures"]
    through_gateway = float((answers.argmax(1) == labels).mean())
    clean = float((_clean_predictions(images) == labels).mean())
    assert through_gateway >= clean - 0.005, (through_gateway, clean)


def test_jbda_stream_is_flagged_alerted_within_a_second_and_misinformed(gateway: Proc) -> None:
    seed = np.ascontiguousarray(load_fashion_mnist("test").images[5000:5100])
    flagged_at = None
    for batch in jbda_stream(seed):
        for start in range(0, len(batch), 100):
            query(gateway, CLASSIFIER, "erin", batch[start:start + 100], batch=100)
            returned = time.monotonic()
            if model_state(gateway, "erin", CLASSIFIER)["status"] != "ok" and flagged_at is None:
                with admin_client(gateway) as admin:
                    alerts = [a for a in admin.list_alerts()["alerts"] if a["client_id"] == "erin"]
                assert alerts and alerts[0]["detector"] == "prada", alerts
                assert _alerts_metric(gateway, "prada") >= 1
                flagged_at = time.monotonic() - returned
    assert flagged_at is not None, model_state(gateway, "erin", CLASSIFIER)
    assert flagged_at < 1.0
    state = model_state(gateway, "erin", CLASSIFIER)
    assert state["figures"]["prada.shapiro_w"] < 0.9 and state["status"] == "flagged", state
    natural = load_fashion_mnist("test").images[6000:6500]
    answers = query(gateway, CLASSIFIER, "erin", natural, batch=100)
    agreement = float((answers.argmax(1) == _clean_predictions(natural)).mean())
    assert agreement < 0.05, f"a flagged client still gets {agreement:.1%} right labels"
    np.testing.assert_allclose(answers.sum(1), 1.0, atol=1e-5)
