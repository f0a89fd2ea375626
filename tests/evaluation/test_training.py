"""How thieves train: a seeded held-out split of their own answers that stays put as answers grow, early
stopping that keeps the best epoch's weights, and the staged attacks stopping each stage on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.attacks import create_attack
from evaluation.attacks.thief import ThiefCNN
from evaluation.attacks.training import (
    StopRule,
    fit_until_stale,
    held_out_split,
    predict,
    train_on_answers,
)
from tests.evaluation.label_victim import fashion_context


def test_held_out_split_is_seeded_disjoint_and_stable_as_the_answers_grow() -> None:
    train, held = held_out_split(1000, 0.1, seed=3)
    assert not set(train) & set(held) and len(train) + len(held) == 1000
    assert 70 <= len(held) <= 130
    np.testing.assert_array_equal(held, held_out_split(1000, 0.1, seed=3)[1])
    assert not np.array_equal(held, held_out_split(1000, 0.1, seed=4)[1])
    more = held_out_split(2500, 0.1, seed=3)[1]
    np.testing.assert_array_equal(more[more < 1000], held)  # a later stage validates on the same rows, and more
    assert len(held_out_split(19, 0.5, seed=0)[1]) == 0  # too few answers to hold any out
    assert len(held_out_split(500, 0.0, seed=0)[1]) == 0


def _scripted(scores: list[float | None], rule: StopRule) -> tuple[torch.nn.Linear, torch.optim.SGD, object]:
    """A model whose weight is the epoch number after each epoch, scored from ``scores``."""
    model = torch.nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    epoch = [0]

    def train_epoch() -> None:
        epoch[0] += 1
        with torch.no_grad():
            model.weight.fill_(float(epoch[0]))

    has_score = any(s is not None for s in scores)
    report = fit_until_stale(model, train_epoch, (lambda: scores[epoch[0] - 1]) if has_score else None, rule, opt,
                             examples=10, progress=False)
    return model, opt, report


def test_early_stopping_keeps_the_best_epochs_weights_and_stops_after_patience() -> None:
    model, opt, report = _scripted([0.5, 0.7, 0.6, 0.65, 0.69, 0.9], StopRule(max_epochs=10, patience=3))
    assert (report.epochs, report.best_epoch, report.held_out) == (5, 2, 0.7)  # epoch 6's 0.9 never came
    assert float(model.weight.detach()) == 2.0  # the weights of epoch 2, not of the last epoch
    assert opt.param_groups[0]["lr"] == 0.25  # halved after each of the two stale epochs it went on from


def test_patience_zero_trains_every_epoch_and_keeps_the_best() -> None:
    model, _, report = _scripted([0.5, 0.7, 0.6, 0.65, 0.69, 0.9, 0.8], StopRule(max_epochs=7, patience=0))
    assert (report.epochs, report.best_epoch, float(model.weight.detach())) == (7, 6, 6.0)


def test_without_held_out_answers_the_last_epoch_is_kept() -> None:
    model, _, report = _scripted([None] * 4, StopRule(max_epochs=4, patience=1))
    assert (report.epochs, report.best_epoch, report.held_out, float(model.weight.detach())) == (4, 4, None, 4.0)


def test_a_copy_of_unlearnable_answers_stops_early_with_its_best_epoch() -> None:
    """Random answers cannot be learnt: held-out agreement stalls at chance and training stops long before
    the cap; the copy returned has the held-out agreement the report names (the best epoch's)."""
    ctx, _ = fashion_context(400, 400)
    rng = np.random.default_rng(0)
    answers = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 400)]
    torch.manual_seed(0)
    model = ThiefCNN((1, 28, 28), 10, width=4)
    rule = StopRule(max_epochs=30, patience=2, val_fraction=0.25)
    report = train_on_answers(model, ctx.pool.images, answers, soft=False, rule=rule, seed=0, split_seed=1,
                              progress=False)
    _, held = held_out_split(400, 0.25, seed=1)
    assert report.epochs < 30 and report.epochs - report.best_epoch == 2
    assert report.examples == 400 - len(held)
    agreement = float((predict(model, ctx.pool.images[held]).argmax(1) == answers[held].argmax(1)).mean())
    assert agreement == pytest.approx(report.held_out) and not model.training


@pytest.mark.parametrize("name", ["knockoff", "copycat", "jbda"])
@pytest.mark.parametrize(("params", "message"), [
    ({"epochs": 3}, "{}.epochs: thieves train until their held-out agreement stops improving; set max_epochs"),
    ({"max_epochs": 0}, "{}.max_epochs must be >= 1"),
    ({"patience": -1}, "{}.patience must be >= 0"),
    ({"val_fraction": 0.7}, "{}.val_fraction must be in [0, 0.5]"),
    ({"patience": 2.5}, "{}.patience must be int"),
])
def test_bad_schedule_params_name_the_field(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        create_attack(name, params, seed=0)
    assert message.format(name) in str(caught.value)


def test_staged_knockoff_early_stops_each_stage_on_its_own_answers() -> None:
    ctx, _ = fashion_context(800, 600)
    result = create_attack("knockoff", {"stages": 2, "width": 8, "max_epochs": 8, "patience": 2},
                           seed=0).run(ctx)
    assert result.queries == 600 == ctx.victim.queries
    assert [t["stage"] for t in result.training] == [1, 2]
    for entry, answered in zip(result.training, (300, 600), strict=True):
        assert 1 <= entry["best_epoch"] <= entry["epochs"] <= 8
        assert entry["epochs"] == 8 or entry["epochs"] - entry["best_epoch"] == 2  # stopped on patience
        assert 0.8 * answered < entry["examples"] < answered  # about a tenth held out
        assert 0.2 < entry["held_out"] <= 1.0  # true labels are learnable: over twice chance (0.1)
    assert result.training[-1]["held_out"] > 0.5  # with 600 answers, far above it
