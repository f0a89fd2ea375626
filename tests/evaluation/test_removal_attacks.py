"""The watermark-aware thieves do what they are named for: noise-robust training drops exactly the answers
its first copy disagrees with, the distilled copy trains on the first copy's labels and never on a victim
answer, and fine-tuning uses the pool's true labels. The victim is an in-process stand-in answering
Fashion-MNIST's true labels, with 5% of them changed (a watermark's stand-in)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from evaluation.attacks import create_attack
from evaluation.attacks.removal import Recorder
from evaluation.attacks.training import predict
from evaluation.client import Refused
from evaluation.data import ImageDataset
from tests.evaluation.label_victim import fashion_context

KNOCKOFF = {"attack": "knockoff", "attack_params": {"stages": 1, "width": 8, "max_epochs": 8, "patience": 2}}


def spy_on_training(attack: Any) -> list[dict[str, Any]]:
    """Record every ``fit_copy`` call of the wrapper's inner attack (copy 1's and the wrapper's own)."""
    calls: list[dict[str, Any]] = []
    real = attack.inner.fit_copy

    def fit_copy(model: torch.nn.Module, x: np.ndarray, answers: np.ndarray, **kw: Any) -> Any:
        calls.append({"model": model, "x": x.copy(), "answers": answers.copy(), **kw})
        return real(model, x, answers, **kw)

    attack.inner.fit_copy = fit_copy
    return calls


def test_noise_robust_retrains_a_fresh_copy_without_the_answers_its_copy_disagrees_with() -> None:
    ctx, marked = fashion_context(1000, 1000, marked=0.05)
    attack = create_attack("noise-robust", KNOCKOFF, seed=0)
    calls = spy_on_training(attack)
    result = attack.run(ctx)
    first, second = calls[0], calls[-1]
    assert len(calls) == 2 and second["model"] is not first["model"] and result.surrogate is second["model"]
    agrees = predict(first["model"], first["x"]).argmax(1) == first["answers"].argmax(1)
    assert 0 < (~agrees).sum() < 500
    np.testing.assert_array_equal(second["x"], first["x"][agrees])  # kept: exactly those copy 1 agrees with
    np.testing.assert_array_equal(second["answers"], first["answers"][agrees])
    assert result.training[-1]["dropped"] == int((~agrees).sum())
    assert ctx.victim.queries == 1000 == result.queries  # no query beyond the inner attack's
    # The changed answers are what it drops most: copy 1 learnt the rule, not the exceptions.
    rows = {img.tobytes(): i for i, img in enumerate(ctx.pool.images)}
    was_marked = marked[[rows[img.tobytes()] for img in first["x"]]]
    on_marked, on_true = (~agrees)[was_marked].mean(), (~agrees)[~was_marked].mean()
    assert on_marked > 0.6 and on_marked > 3 * on_true, (on_marked, on_true)


def test_distilled_copy_trains_only_on_the_first_copys_labels() -> None:
    ctx, _ = fashion_context(1500, 600)
    attack = create_attack("distill", {**KNOCKOFF, "images": 800}, seed=0)
    calls = spy_on_training(attack)
    result = attack.run(ctx)
    first, second = calls[0], calls[-1]
    assert len(calls) == 2 and second["model"] is not first["model"] and result.surrogate is second["model"]
    assert len(second["x"]) == 800 and second["soft"] is True
    teacher = torch.softmax(torch.from_numpy(predict(first["model"], second["x"])), dim=1).numpy()
    np.testing.assert_allclose(second["answers"], teacher, rtol=1e-5, atol=1e-6)  # copy 1's probabilities
    assert (second["answers"].max(1) < 1.0).all()  # never a victim answer (the victim answers one-hot)
    assert ctx.victim.queries == 600 == result.queries  # labelling the pool costs no query


def test_distill_takes_as_many_pool_images_as_the_victim_answered_by_default() -> None:
    ctx, _ = fashion_context(1500, 500)
    attack = create_attack("distill", {**KNOCKOFF, "labels": "hard"}, seed=0)
    calls = spy_on_training(attack)
    attack.run(ctx)
    assert len(calls[-1]["x"]) == 500 and calls[-1]["soft"] is False


def test_fine_tune_uses_the_pools_true_labels_on_the_first_copy() -> None:
    ctx, _ = fashion_context(1500, 600, marked=0.3)
    attack = create_attack("fine-tune", {**KNOCKOFF, "labelled": 200, "lr": 5e-4}, seed=0)
    calls = spy_on_training(attack)
    result = attack.run(ctx)
    first, tune = calls[0], calls[-1]
    assert len(calls) == 2 and tune["model"] is first["model"] is result.surrogate  # the copy, fine-tuned
    assert len(tune["x"]) == 200 and tune["lr"] == 5e-4 and tune["soft"] is False
    rows = {img.tobytes(): i for i, img in enumerate(ctx.pool.images)}
    truth = ctx.pool.labels[[rows[img.tobytes()] for img in tune["x"]]]
    np.testing.assert_array_equal(tune["answers"], np.eye(10, dtype=np.float32)[truth])
    assert ctx.victim.queries == 600 == result.queries


def test_fine_tune_refuses_a_pool_without_the_models_labels() -> None:
    ctx, _ = fashion_context(300, 100)
    ctx.pool = ImageDataset(images=ctx.pool.images, labels=None, classes=())
    with pytest.raises(ValueError, match="fine-tune needs a pool labelled with the model's classes"):
        create_attack("fine-tune", {**KNOCKOFF, "labelled": 50}, seed=0).run(ctx)


@pytest.mark.parametrize(("name", "params", "message"), [
    ("noise-robust", {}, "noise-robust.attack must name a classifier attack"),
    ("noise-robust", {"attack": "direct"}, "noise-robust.attack must name a classifier attack that trains its own"),
    ("distill", {"attack": "sybil", "attack_params": {"attack": "knockoff"}}, "distill.attack must name a classifier"),
    ("distill", {"attack": "knockoff", "images": -1}, "distill.images must be >= 0"),
    ("distill", {"attack": "knockoff", "labels": "fuzzy"}, "distill.labels must be one of"),
    ("fine-tune", {"attack": "knockoff", "labelled": 0}, "fine-tune.labelled must be >= 1"),
    ("fine-tune", {"attack": "knockoff", "lr": 0}, "fine-tune.lr must be > 0"),
    ("fine-tune", {"attack": "knockoff", "attack_params": {"epochs": 3}}, "knockoff.epochs"),
])
def test_bad_params_name_the_field(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        create_attack(name, params, seed=0)
    assert message in str(caught.value)


def test_recorder_keeps_the_answered_part_of_a_refused_batch() -> None:
    class Half:
        queries, refused_after = 0, None

        def query(self, x: np.ndarray) -> np.ndarray:
            raise Refused("PERMISSION_DENIED", "blocked", np.ones((len(x) // 2, 3), np.float32))

    recorder = Recorder(Half())
    with pytest.raises(Refused):
        recorder.query(np.zeros((4, 1, 2, 2), np.float32))
    x, y = recorder.answered()
    assert x.shape == (2, 1, 2, 2) and y.shape == (2, 3)
