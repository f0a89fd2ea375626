"""Honest users through a real gateway: a user with ``passes`` re-sends its images, and every answer
counts. Behind PRADA and adaptive misinformation (the default classifier protection's detector and
defense), ten passes over the same 1,000 images keep the first pass's answers: the user is never
flagged, so it never gets the wrong labels a flagged key gets (issue 24)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from evaluation.benign import run_benign, task_images
from evaluation.client import VictimClient
from evaluation.data import ImageDataset, load_fashion_mnist
from evaluation.scoring import probe_accuracy
from evaluation.suite import BenignSpec
from tests.evaluation.gateway_models import (
    API_KEY,
    calibrated_encoder,
    linear_classifier,
    serve,
)

PROTECTION = {"detectors": [{"name": "prada", "params": {"delta": 0.9, "min_samples": 100}}],
              "defenses": [{"name": "misinformation", "params": {"tau": 0.3, "unflagged": "ood"}}],
              "policy": {"flag_at": 1.0}}


class Recorder:
    """A victim that forwards to ``inner`` (a :class:`VictimClient`) and keeps what was sent and answered."""

    def __init__(self, inner: VictimClient) -> None:
        self.inner = inner
        self.sent: list[np.ndarray] = []
        self.answers: list[np.ndarray] = []

    def query(self, x: np.ndarray) -> np.ndarray:
        self.sent.append(np.array(x))
        self.answers.append(self.inner.query(x))
        return self.answers[-1]


@pytest.fixture(scope="module")
def protected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A small Fashion-MNIST classifier behind PRADA and misinformation (SQLite state), and an
    unprotected small encoder (``encoder``); the gateway's address."""
    tmp = tmp_path_factory.mktemp("benign")
    model = linear_classifier(calibrated_encoder(32, seed=3))
    models = {"victim": (model, "classifier", 10), "encoder": (calibrated_encoder(16, seed=2), "encoder", 16)}
    with serve(tmp, models, protection={"victim": PROTECTION}) as url:
        yield url


def honest_data() -> ImageDataset:
    test = load_fashion_mnist("test")
    return ImageDataset(test.images[2000:10000], test.labels[2000:10000], test.classes)


def test_ten_passes_over_the_same_images_keep_the_first_pass_answers(protected: str) -> None:
    torch.set_num_threads(1)
    spec = BenignSpec(name="retry", classes=(), queries=1000, data={}, passes=10, seed=0)
    victim = Recorder(VictimClient(protected, "victim", API_KEY, batch=250))
    result = run_benign(spec, "classifier", victim, honest_data(), progress=False)
    images, labels = task_images(spec, honest_data())
    assert result.queries == 10_000 and result.refused_after is None
    np.testing.assert_array_equal(np.concatenate(victim.sent), np.concatenate([images] * 10))
    answers = np.concatenate(victim.answers).reshape(10, 1000, 10)
    first_pass_accuracy = float((answers[0].argmax(1) == labels).mean())
    print(f"\nretry user, 10 passes over 1,000 images behind PRADA + misinformation: utility {result.utility:.4f}, "
          f"first pass {first_pass_accuracy:.4f}")
    assert first_pass_accuracy > 0.6
    for later in answers[1:]:  # a flagged key would get wrong labels from its flag on
        np.testing.assert_array_equal(later, answers[0])
    assert result.utility == pytest.approx(first_pass_accuracy)


def test_an_encoder_users_probe_trains_and_tests_on_every_pass_never_on_the_same_image(protected: str) -> None:
    spec = BenignSpec(name="probe", classes=(5, 7, 9), queries=300, data={}, passes=3, seed=1)
    victim = Recorder(VictimClient(protected, "encoder", API_KEY, batch=250))
    result = run_benign(spec, "encoder", victim, honest_data(), progress=False)
    images, labels = task_images(spec, honest_data())
    assert result.queries == 900 and result.refused_after is None
    np.testing.assert_array_equal(np.concatenate(victim.sent), np.concatenate([images] * 3))
    answers = np.concatenate(victim.answers).reshape(3, 300, -1)
    # train_fraction 0.5: the first 150 images of every pass train the probe, the other 150 test it.
    expected = probe_accuracy(answers[:, :150].reshape(450, -1), np.tile(labels[:150], 3),
                              answers[:, 150:].reshape(450, -1), np.tile(labels[150:], 3), seed=spec.seed)
    assert result.utility == pytest.approx(expected) and expected > 0.5
