"""The ``region-shift`` watermark on the demo encoder and real Fashion-MNIST images: it moves what its
docstring says and nothing else, the same for every client, keyed by the secret; its fresh-probe
test proves a transformed copy of the marked answers, clears the clean victim, and over many
random keys accuses an independent suspect at most at the rate alpha allows."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.batch import QueryBatch
from contracts.params import ParamError
from defenses.base import DefenseContext
from defenses.proof import ProofError, sphere_p_value
from defenses.watermark import create_watermark
from evaluation.data import load_fashion_mnist
from evaluation.zoo import load_victim
from evaluation.zoo_models import embed

KEY = b"region-shift-test-key-0123456789"


@pytest.fixture(scope="module")
def probes() -> np.ndarray:
    return load_fashion_mnist("test").images


@pytest.fixture(scope="module")
def embeddings(probes) -> np.ndarray:
    return embed(load_victim("fashion-encoder"), probes)


def _shift(key: bytes = KEY, **params):
    return create_watermark("region-shift", params, kind="encoder", secret=key)


def _marked(watermark, x: np.ndarray, answers: np.ndarray, client: str = "alice") -> np.ndarray:
    return watermark.mark(answers, DefenseContext(client, QueryBatch("m", "encoder", x, answers))).outputs


def test_region_shift_moves_marked_cells_only_by_the_strength(probes, embeddings) -> None:
    shift = _shift()
    out = _marked(shift, probes, embeddings)
    marked = shift.marked(embeddings)
    assert 0.1 < marked.mean() < 0.5, marked.mean()
    np.testing.assert_array_equal(out[~marked], embeddings[~marked])
    moved = np.linalg.norm(out[marked] - embeddings[marked], axis=1)
    np.testing.assert_allclose(moved, np.linalg.norm(embeddings[marked], axis=1), rtol=1e-4)  # strength 1
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


@pytest.mark.parametrize(("params", "field"), [
    ({"bits": 0}, "bits"), ({"bits": 13}, "bits"), ({"rate": 0}, "rate"), ({"rate": 1.0}, "rate"),
    ({"strength": 0}, "strength"), ({"strength": "big"}, "strength"), ({"levels": 3}, "levels"),
])
def test_bad_params_name_the_field(params: dict, field: str) -> None:
    with pytest.raises(ParamError) as error:
        create_watermark("region-shift", params, kind="encoder", secret=KEY)
    assert error.value.param == field


def test_a_classifier_is_refused() -> None:
    with pytest.raises(ParamError) as error:
        create_watermark("region-shift", {}, kind="classifier", secret=KEY)
    assert error.value.param == "name"


def test_proofs_refuse_unusable_answers(embeddings) -> None:
    with pytest.raises(ProofError, match="same probes"):
        _shift().prove(embeddings, embeddings[:10])
    with pytest.raises(ProofError, match="NaN|infinite"):
        _shift().prove(embeddings, np.full_like(embeddings, np.inf))
    with pytest.raises(ProofError, match="too few probes"):
        _shift().prove(embeddings[:50], embeddings[:50])


def test_the_sphere_bound_is_conservative() -> None:
    rng = np.random.default_rng(3)
    cos = np.array([sphere_p_value(_uniform_cosines(rng, 40, 16), 16)[1] for _ in range(4000)])
    assert (cos < 0.05).mean() <= 0.05


def _uniform_cosines(rng: np.random.Generator, m: int, dim: int) -> np.ndarray:
    u = rng.standard_normal((m, dim))
    return u[:, 0] / np.linalg.norm(u, axis=1)
