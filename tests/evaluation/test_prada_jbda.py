"""PRADA against the query stream the JBDA attack itself sends (its substitute retrained each
round, so no query repeats another): flagged, and flagged at the same W with repeats, exact and
re-encoded, interleaved. Here rather than in tests/unit because the attack's client code imports
tritonclient, whose protos clash with the gateway's in one process (see the Makefile)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from evaluation.attacks.base import AttackContext
from evaluation.attacks.classifier import Jbda
from evaluation.data import ImageDataset, load_fashion_mnist
from evaluation.zoo import load_victim
from tests.unit.detectors.test_algorithms import assert_flagged_also_with_repeats


class Recorder:
    """The victim ``classifier`` answering softmax probabilities, keeping every batch it was sent."""

    def __init__(self, classifier: torch.jit.ScriptModule) -> None:
        self.classifier = classifier
        self.sent: list[np.ndarray] = []

    def query(self, x: np.ndarray) -> np.ndarray:
        self.sent.append(np.array(x))
        with torch.no_grad():
            return torch.softmax(self.classifier(torch.from_numpy(np.ascontiguousarray(x))), 1).numpy()


def jbda_attack_queries(classifier: torch.jit.ScriptModule, budget: int = 2400) -> np.ndarray:
    """The queries float32 [budget, 1, 28, 28] the JBDA attack sends to ``classifier`` (the quick
    suite's seed set and rounds, fewer epochs)."""
    train = load_fashion_mnist("train")
    victim = Recorder(classifier)
    # As the suite's runner does: the substitute's initialisation, hence the stream, is seeded.
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ctx = AttackContext(victim=victim, kind="classifier", input_shape=(1, 28, 28), num_outputs=10,  # type: ignore[arg-type]
                        budget=budget, seed=0, progress=False,
                        pool=ImageDataset(train.images[:50000], None, train.classes), eval_x=train.images[:1])
    Jbda({"seed_size": 150, "rounds": 4, "max_epochs": 3, "patience": 0}, seed=0).run(ctx)
    return np.concatenate(victim.sent)


def test_prada_flags_the_jbda_attacks_stream_also_with_repeats_interleaved(tmp_path: Path) -> None:
    classifier = load_victim("fashion-classifier")
    attack = jbda_attack_queries(classifier)
    assert len(np.unique(attack.reshape(len(attack), -1), axis=0)) == len(attack) == 2400
    assert_flagged_also_with_repeats(classifier, attack, tmp_path, "jbda attack")
