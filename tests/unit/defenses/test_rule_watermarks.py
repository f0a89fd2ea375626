"""The rule watermarks on the demo models and real Fashion-MNIST images: ``tie-tilt`` (classifier)
and ``region-shift`` (encoder) change what their docstrings say and nothing else, the same for
every client, keyed by the secret; their fresh-probe tests prove a copy of the marked answers,
clear the clean victim, and over many random keys accuse an independent suspect at most at the
rate alpha allows."""

from __future__ import annotations

import numpy as np
import pytest

from defenses.base import DefenseContext
from defenses.proof import ProofError, sign_p_value, sphere_p_value
from defenses.watermark import create_watermark
from detectors.base import QueryBatch
from evaluation.data import load_fashion_mnist
from evaluation.zoo import load_victim
from evaluation.zoo_models import embed
from gateway.params import ParamError

KEY = b"rule-watermark-test-key-0123456789"


@pytest.fixture(scope="module")
def probes() -> np.ndarray:
    return load_fashion_mnist("test").images


@pytest.fixture(scope="module")
def probs(probes) -> np.ndarray:
    return embed(load_victim("fashion-classifier"), probes)


@pytest.fixture(scope="module")
def embeddings(probes) -> np.ndarray:
    return embed(load_victim("fashion-encoder"), probes)


def _tilt(key: bytes = KEY, **params):
    return create_watermark("tie-tilt", params, kind="classifier", secret=key)


def _shift(key: bytes = KEY, **params):
    return create_watermark("region-shift", params, kind="encoder", secret=key)


def _marked(watermark, x: np.ndarray, answers: np.ndarray, client: str = "alice") -> np.ndarray:
    kind = "classifier" if watermark.name == "tie-tilt" else "encoder"
    return watermark.mark(answers, DefenseContext(client, QueryBatch("m", kind, x, answers))).outputs


def test_tie_tilt_swaps_the_top_two_on_near_ties_only(probes, probs) -> None:
    out = _marked(_tilt(), probes, probs)
    ordered = np.sort(probs, axis=1)
    near = ordered[:, -1] - ordered[:, -2] < 0.15
    changed = np.any(out != probs, axis=1)
    assert not changed[~near].any()
    assert 0.3 < changed[near].mean() < 0.7, changed[near].mean()  # a fair keyed sign per cell
    top2 = np.argsort(-probs, axis=1)[:, :2]
    assert np.all(np.isin(out[changed].argmax(1), top2[changed].ravel()))
    np.testing.assert_allclose(np.sort(out, axis=1), np.sort(probs, axis=1))  # a swap: the same values
    assert out.dtype == np.float32


def test_tie_tilt_is_the_same_for_every_client_and_keyed(probes, probs) -> None:
    alice, bob = _marked(_tilt(), probes, probs, "alice"), _marked(_tilt(), probes, probs, "bob")
    np.testing.assert_array_equal(alice, bob)
    other = _marked(_tilt(b"another-secret-key-0123456789"), probes, probs)
    assert np.any(other.argmax(1) != alice.argmax(1))


def test_tie_tilt_proves_a_copy_of_its_answers_on_fresh_probes(probes, probs) -> None:
    tilt = _tilt()
    marked = _marked(tilt, probes, probs)
    proof = tilt.prove(probes, probs, marked)
    assert proof.p_value < 1e-6 and proof.as_dict()["verdict"] == "stolen", proof
    clean = tilt.prove(probes, probs, probs)
    assert clean.p_value > 0.01, clean


def test_tie_tilt_false_proofs_over_random_keys_stay_under_alpha(probes, probs) -> None:
    # An independent suspect: the victim's scores moved by noise that no key knows.
    logits = np.log(np.maximum(probs, 1e-12)) + np.random.default_rng(0).normal(0, 1.0, probs.shape)
    p = np.array([_tilt(f"random-key-{i:04d}-0123456789".encode()).prove(probes, probs, logits).p_value
                  for i in range(200)])
    assert (p < 0.05).mean() <= 0.05 + 0.03, np.sort(p)[:12]  # + ~2 binomial sd over 200 keys


def test_region_shift_moves_marked_cells_only_by_the_strength(probes, embeddings) -> None:
    shift = _shift()
    out = _marked(shift, probes, embeddings)
    marked = shift.marked(embeddings)
    assert 0.1 < marked.mean() < 0.5, marked.mean()
    np.testing.assert_array_equal(out[~marked], embeddings[~marked])
    moved = np.linalg.norm(out[marked] - embeddings[marked], axis=1)
    np.testing.assert_allclose(moved, 0.5 * np.linalg.norm(embeddings[marked], axis=1), rtol=1e-4)
    np.testing.assert_array_equal(out, _marked(shift, probes, embeddings, "bob"))


def test_region_shift_proves_a_transformed_copy_and_clears_the_victim(embeddings) -> None:
    shift = _shift()
    marked = shift.mark(embeddings, None).outputs
    # A key's B4B space (or a copy's own): an unknown affine map of the marked answers, with noise.
    rng = np.random.default_rng(1)
    suspect = marked @ rng.standard_normal((128, 160)) + 2.0 + rng.normal(0, 0.5, (len(marked), 160))
    proof = shift.prove(embeddings, suspect)
    assert proof.p_value < 1e-6 and proof.figures["mean_cos"] > 0.5, proof
    assert shift.prove(embeddings, embeddings).p_value > 0.01


def test_region_shift_false_proofs_over_random_keys_stay_under_alpha(embeddings) -> None:
    rng = np.random.default_rng(2)
    suspect = np.tanh(embeddings @ rng.standard_normal((128, 64)) / 10) + rng.normal(0, 0.1, (len(embeddings), 64))
    p = np.array([_shift(f"random-key-{i:04d}-0123456789".encode()).prove(embeddings, suspect).p_value
                  for i in range(200)])
    assert (p < 0.05).mean() <= 0.05 + 0.03, np.sort(p)[:12]


@pytest.mark.parametrize(("name", "params", "field"), [
    ("tie-tilt", {"margin": 0}, "margin"), ("tie-tilt", {"margin": 1.0}, "margin"),
    ("tie-tilt", {"bits": 9}, "bits"), ("tie-tilt", {"probe_margin": 0}, "probe_margin"),
    ("tie-tilt", {"rate": 0.1}, "rate"), ("region-shift", {"bits": 13}, "bits"),
    ("region-shift", {"rate": 1.0}, "rate"), ("region-shift", {"strength": 0}, "strength"),
])
def test_bad_params_name_the_field(name: str, params: dict, field: str) -> None:
    kind = "classifier" if name == "tie-tilt" else "encoder"
    with pytest.raises(ParamError) as error:
        create_watermark(name, params, kind=kind, secret=KEY)
    assert error.value.param == field


@pytest.mark.parametrize(("name", "kind"), [("tie-tilt", "encoder"), ("region-shift", "classifier")])
def test_wrong_kind_is_refused(name: str, kind: str) -> None:
    with pytest.raises(ParamError) as error:
        create_watermark(name, {}, kind=kind, secret=KEY)
    assert error.value.param == "name"


def test_proofs_refuse_unusable_answers(probes, probs, embeddings) -> None:
    with pytest.raises(ProofError, match="NaN"):
        _tilt().prove(probes, probs, np.full_like(probs, np.nan))
    with pytest.raises(ProofError, match="same"):
        _tilt().prove(probes, probs, probs[:10])
    with pytest.raises(ProofError, match="NaN|infinite"):
        _shift().prove(embeddings, np.full_like(embeddings, np.inf))
    with pytest.raises(ProofError, match="too few probes"):
        _shift().prove(embeddings[:50], embeddings[:50])


def test_null_bounds_are_conservative() -> None:
    rng = np.random.default_rng(3)
    scores = rng.exponential(size=50)
    z = np.array([sign_p_value(rng.choice([-1.0, 1.0], 50), scores)[1] for _ in range(4000)])
    assert (z < 0.05).mean() <= 0.05
    cos = np.array([sphere_p_value(_uniform_cosines(rng, 40, 16), 16)[1] for _ in range(4000)])
    assert (cos < 0.05).mean() <= 0.05


def _uniform_cosines(rng: np.random.Generator, m: int, dim: int) -> np.ndarray:
    u = rng.standard_normal((m, dim))
    return u[:, 0] / np.linalg.norm(u, axis=1)
