"""Classifier defenses: exact values of rounding, top-k and label-only, the reverse sigmoid's kept
argmax, and Adaptive Misinformation on the real demo classifier and the full Fashion-MNIST test set."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from contracts.batch import QueryBatch
from defenses.base import Defense, DefenseContext, create_defense
from defenses.codes import PooledQueries, query_codes
from defenses.misinformation import AdaptiveMisinformation

SECRET = b"classifier-defense-secret"


def _build(name: str, **params: Any) -> Defense:
    return create_defense(name, params, kind="classifier", secret=SECRET)


def _apply(defense: Defense, probs: np.ndarray, inputs: np.ndarray | None = None, *, flagged: bool = False,
           client: str = "alice") -> np.ndarray:
    p = np.asarray(probs, dtype=np.float32)
    x = np.zeros((len(p), 1, 28, 28), dtype=np.float32) if inputs is None else inputs
    return defense.apply(p, DefenseContext(client, QueryBatch("clf", "classifier", x, p), flagged=flagged))


# ----------------------------------------------------------------------------- output perturbations
def test_reverse_sigmoid_keeps_the_argmax_and_sums_to_one() -> None:
    rng = np.random.default_rng(0)
    probs = np.concatenate([rng.dirichlet(np.full(10, a), size=200) for a in (0.05, 0.3, 1.0, 30.0)])
    probs[:10] = np.eye(10)  # exact 0 and 1: the logit is taken on clipped values
    out = _apply(_build("reverse_sigmoid"), probs)
    np.testing.assert_array_equal(out.argmax(axis=1), probs.argmax(axis=1))
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)
    assert np.abs(out - probs).sum(axis=1).mean() > 0.2  # a real perturbation, not a no-op


def test_reverse_sigmoid_value() -> None:
    # ART's formula by hand for one row: r = β(σ(γ·logit p) − 0.5), p̃ = normalise(clip(p − r, 0, 1)).
    p = np.array([0.7, 0.2, 0.1])
    r = 1.0 * (1.0 / (1.0 + np.exp(-0.1 * np.log(p / (1 - p)))) - 0.5)
    expected = np.clip(p - r, 0, 1) / np.clip(p - r, 0, 1).sum()
    np.testing.assert_allclose(_apply(_build("reverse_sigmoid"), p[None])[0], expected, atol=1e-6)


def test_rounding_keeps_exact_multiples_that_sum_to_one() -> None:
    out = _apply(_build("rounding"), [[0.3334, 0.3333, 0.3333], [0.0004, 0.0004, 0.9992]])
    np.testing.assert_allclose(out, [[0.334, 0.333, 0.333], [0.001, 0.0, 0.999]], atol=1e-7)  # tie: lower index
    np.testing.assert_allclose(_apply(_build("rounding", decimals=1), [[0.26, 0.26, 0.48]]), [[0.3, 0.2, 0.5]],
                               atol=1e-7)
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(10, 0.5), size=500)
    out = _apply(_build("rounding", decimals=3), probs).astype(np.float64)
    np.testing.assert_allclose(out * 1000, np.rint(out * 1000), atol=1e-3)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)
    assert np.abs(out - probs).max() < 1e-3


def test_top_k_keeps_the_k_largest() -> None:
    p = [[0.1, 0.6, 0.3], [0.4, 0.2, 0.4]]
    np.testing.assert_allclose(_apply(_build("top_k", k=2), p), [[0, 2 / 3, 1 / 3], [0.5, 0, 0.5]], atol=1e-6)
    np.testing.assert_allclose(_apply(_build("top_k"), p), [[0, 1, 0], [1, 0, 0]])  # ties: lower index
    np.testing.assert_allclose(_apply(_build("top_k", k=3), p), p, atol=1e-6)


def test_label_only_is_the_one_hot_argmax() -> None:
    p = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(_apply(_build("label_only"), p), np.eye(3, dtype=np.float32)[[1, 0, 2]])


# ----------------------------------------------------------------------------- misinformation, synthetic
def test_misinformation_gate() -> None:
    defense = _build("misinformation", tau=0.5, nu=1000)
    p = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.5, 0.3, 0.2]])
    inputs = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    out = _apply(defense, p, inputs)
    np.testing.assert_array_equal(out[0], p[0].astype(np.float32))  # confident: bit-identical
    assert out[1].argmax() != 0 and out[1].max() == pytest.approx(1.0, abs=1e-6)  # h ≈ 1: a wrong label
    wrong = int(np.argmax(out[2] - 0.5 * p[2]))  # max y = τ: h = 1/2, half clean, half wrong one-hot
    assert wrong != 0
    np.testing.assert_allclose(out[2], 0.5 * p[2] + 0.5 * np.eye(3)[wrong], atol=1e-6)
    flagged = _apply(defense, p, inputs, flagged=True)
    assert (flagged.argmax(axis=1) != 0).all() and np.allclose(flagged.max(axis=1), 1.0)
    off = _build("misinformation", unflagged="off")
    np.testing.assert_array_equal(_apply(off, p, inputs), p.astype(np.float32))
    assert (_apply(off, p, inputs, flagged=True).argmax(axis=1) != 0).all()
    assert isinstance(defense, AdaptiveMisinformation)
    np.testing.assert_allclose(defense.gate(p, flagged=False), [0.0, 1.0, 0.5], atol=1e-12)


def test_query_codes_are_coarse() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((1, 1, 28, 28), dtype=np.float32)
    assert query_codes(image) == query_codes(image.copy())
    blocks = np.kron(rng.random((50, 1, 7, 7), dtype=np.float32), np.ones((4, 4), dtype=np.float32))
    assert len(set(query_codes(blocks))) == 50  # 49 coarse cells tell distinct images apart
    assert len(query_codes(rng.random((2, 3, 32, 32), dtype=np.float32))) == 2  # colour: first channel
    assert len(query_codes(rng.random((2, 5), dtype=np.float32))) == 2  # flat features: a 1×5 "image"


def test_an_answers_context_codes_its_queries_as_query_codes_does() -> None:
    """Pooled once per answer and shared by misinformation and the watermark: the same codes as
    coding each row on its own, for all rows or a subset, before and after the batch was pooled."""
    x = np.random.default_rng(1).random((5, 1, 28, 28), dtype=np.float32)
    p = np.full((5, 3), 1 / 3, dtype=np.float32)
    rows = np.array([1, 3])
    for first_rows in (rows, None):  # a subset first pools only those rows; all rows first are kept
        context = DefenseContext("alice", QueryBatch("clf", "classifier", x, p))
        assert context.query_codes(2, first_rows) == query_codes(x if first_rows is None else x[rows], 2)
        assert context.query_codes(3) == query_codes(x, 3)
        assert context.query_codes(2, rows) == query_codes(x[rows], 2)


def test_queries_pooled_beforehand_give_the_codes_of_pooling_them_in_the_context() -> None:
    """The gateway pools an answer's queries while the model computes it (``PooledQueries.of``):
    a context handed them codes exactly as one that pools them itself, for all rows or a subset."""
    x = np.random.default_rng(2).random((6, 1, 28, 28), dtype=np.float32)
    p = np.full((6, 3), 1 / 3, dtype=np.float32)
    rows = np.array([0, 4])
    pooled = PooledQueries.of(x, (3,))
    assert pooled.codes(3) == query_codes(x, 3) and pooled.codes(2) == query_codes(x, 2)
    context = DefenseContext("alice", QueryBatch("clf", "classifier", x, p), pooled=pooled)
    assert context.query_codes(2, rows) == query_codes(x[rows], 2)
    assert context.query_codes(3) == query_codes(x, 3)
    with pytest.raises(ValueError, match="queries must be"):
        PooledQueries.of(np.zeros(2, np.float32))  # [B] is no image


@pytest.mark.parametrize("params", [{}, {"tau": 0.5, "nu": 40.0}, {"unflagged": "off"}])
def test_misinformation_leaves_confident_answers_as_the_full_gate_would(
        params: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Unflagged answers whose top probability clears τ + 30/ν skip the gate's arithmetic; every
    answer, on either side of that bound and at it, is bit-identical to the full computation's."""
    defense = _build("misinformation", **params)
    assert isinstance(defense, AdaptiveMisinformation)
    rng = np.random.default_rng(3)
    bound = defense.tau + 30.0 / defense.nu
    top = np.concatenate([rng.uniform(0.1, 1.0, 300), np.clip(bound + rng.normal(0, 1e-3, 200), 0.1, 1.0), [bound]])
    probs = np.empty((len(top), 4), np.float32)
    probs[:, 0] = top
    probs[:, 1:] = ((1.0 - top[:, None]) * rng.dirichlet(np.ones(3), len(top)))
    inputs = rng.random((len(top), 1, 28, 28), dtype=np.float32)
    for flagged in (False, True):
        for i in range(0, len(top), 25):  # batches of 25 and single rows alike
            for rows in (slice(i, i + 25), slice(i, i + 1)):
                fast = _apply(defense, probs[rows], inputs[rows], flagged=flagged)
                with monkeypatch.context() as patch:
                    patch.setattr(defense, "_untouched", lambda *_: False)
                    full = _apply(defense, probs[rows], inputs[rows], flagged=flagged)
                np.testing.assert_array_equal(fast, full)
    confident = probs[top >= bound + 1e-3][:1]
    assert _apply(defense, confident, inputs[:1]).tobytes() == confident.tobytes()


def test_misinformation_answers_a_flagged_client_with_the_keyed_one_hot() -> None:
    defense = _build("misinformation")
    assert isinstance(defense, AdaptiveMisinformation)
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(10), size=6).astype(np.float32)
    x = rng.random((6, 1, 28, 28), dtype=np.float32)
    wrong = defense.wrong_labels("alice", x, p.argmax(axis=1), 10)
    np.testing.assert_array_equal(_apply(defense, p, x, flagged=True), np.eye(10, dtype=np.float32)[wrong])


# ----------------------------------------------------------------------------- misinformation, real model


@pytest.fixture(scope="module")
def fashion() -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """(classifier, test images float32 [10000,1,28,28], labels int64 [10000], clean probabilities [10000,10])."""
    from evaluation.data import load_fashion_mnist
    from evaluation.zoo import load_victim
    from evaluation.zoo_models import embed

    test = load_fashion_mnist("test")
    model = load_victim("fashion-classifier")
    return model, test.images, test.labels, embed(model, test.images)


def test_misinformation_spares_honest_users(fashion: tuple[Any, np.ndarray, np.ndarray, np.ndarray]) -> None:
    _, images, labels, clean = fashion
    out = _apply(_build("misinformation"), clean, images, client="honest")
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    clean_acc, acc = np.mean(clean.argmax(1) == labels), np.mean(out.argmax(1) == labels)
    changed = np.mean(out.argmax(1) != clean.argmax(1))
    print(f"honest user: accuracy {clean_acc:.4f} -> {acc:.4f}, labels changed {changed:.2%}")
    assert clean_acc - acc < 0.005
    assert 0 < changed < 0.01  # the lowest-confidence answers only


def test_reverse_sigmoid_on_the_demo_classifier(fashion: tuple[Any, np.ndarray, np.ndarray, np.ndarray]) -> None:
    _, images, _, clean = fashion
    out = _apply(_build("reverse_sigmoid"), clean, images)
    np.testing.assert_array_equal(out.argmax(axis=1), clean.argmax(axis=1))
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_misinformation_gives_flagged_clients_wrong_labels(
        fashion: tuple[Any, np.ndarray, np.ndarray, np.ndarray]) -> None:
    _, images, labels, clean = fashion
    out = _apply(_build("misinformation"), clean, images, flagged=True, client="thief")
    agreement = np.mean(out.argmax(1) == clean.argmax(1))
    print(f"flagged client: top-1 agreement with the clean argmax {agreement:.2%}, "
          f"accuracy {np.mean(out.argmax(1) == labels):.2%}")
    assert agreement < 0.02
    np.testing.assert_allclose(out.max(axis=1), 1.0, atol=1e-6)


def test_near_duplicates_get_the_same_wrong_label(fashion: tuple[Any, np.ndarray, np.ndarray, np.ndarray]) -> None:
    from evaluation.zoo_models import embed

    model, images, _, clean = fashion
    defense = _build("misinformation")
    rng = np.random.default_rng(0)
    same = []
    for i in rng.choice(len(images), 100, replace=False):
        steps = rng.choice(np.float32([-1, 1]), size=(20, 1, 28, 28)) / np.float32(255)  # one grey level
        dups = np.clip(images[i][None] + steps, 0.0, 1.0).astype(np.float32)
        first = _apply(defense, clean[i:i + 1], images[i:i + 1], flagged=True, client="thief").argmax()
        answers = _apply(defense, embed(model, dups), dups, flagged=True, client="thief").argmax(axis=1)
        same.append(np.mean(answers == first))
    print(f"near-duplicates with the original's wrong label: {np.mean(same):.1%}")
    assert np.mean(same) >= 0.93
