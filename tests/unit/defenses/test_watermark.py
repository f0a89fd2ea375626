"""DAWN on real Fashion-MNIST images and the demo classifier: selection rate, keying, robustness to
near-duplicates, consistent wrong labels, distributions kept; the compact query encoding."""

from __future__ import annotations

import numpy as np
import pytest

from defenses.base import DefenseContext
from defenses.watermark import DAWN, create_watermark, decode_query, encode_query
from detectors.base import QueryBatch
from evaluation.data import load_fashion_mnist
from evaluation.zoo import load_victim
from evaluation.zoo_models import embed
from gateway.params import ParamError

KEY = b"watermark-test-key-0123456789"


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    images = load_fashion_mnist("train").images[:20_000]
    return images, embed(load_victim("fashion-classifier"), images)


def _mark(w: DAWN, x: np.ndarray, p: np.ndarray, client: str = "alice"):
    return w.mark(p, DefenseContext(client, QueryBatch("clf", "classifier", x, p)))


def test_selection_rate_is_close_to_r_and_keyed(data) -> None:
    x, p = data
    for rate in (0.005, 0.02):
        chosen = DAWN({"rate": rate}, kind="classifier", secret=KEY).selected(x, p)
        # Binomial sd at n=20,000 is 0.05 points for r=0.5%; codes shared by several images widen it.
        assert abs(chosen.mean() - rate) < 0.35 * rate, (rate, chosen.mean())
    a = DAWN({"rate": 0.02}, kind="classifier", secret=KEY).selected(x, p)
    b = DAWN({"rate": 0.02}, kind="classifier", secret=b"another-key-0123456789").selected(x, p)
    assert (a & b).sum() < 0.1 * a.sum()  # another key selects other queries


def test_near_duplicates_keep_selection_and_label(data) -> None:
    x, p = data
    w = DAWN({"rate": 0.05}, kind="classifier", secret=KEY)
    chosen = np.nonzero(w.selected(x, p))[0][:300]
    rng = np.random.default_rng(0)
    jitter = np.clip(x[chosen] + rng.choice([-1, 1], x[chosen].shape) / 255, 0, 1).astype(np.float32)
    p_jitter = embed(load_victim("fashion-classifier"), jitter)
    kept = w.selected(jitter, p_jitter)
    assert kept.mean() > 0.9, kept.mean()
    same = w.labels(jitter[kept], p_jitter[kept]) == w.labels(x[chosen][kept], p[chosen][kept])
    assert same.mean() > 0.97


def test_marked_answers_are_consistent_wrong_and_distributions(data) -> None:
    x, p = data
    w = DAWN({"rate": 0.02}, kind="classifier", secret=KEY)
    first, again = _mark(w, x[:5000], p[:5000]), _mark(w, x[:5000], p[:5000], client="bob")
    assert len(first.records) > 50
    np.testing.assert_array_equal(first.outputs, again.outputs)  # same query, same answer, any client
    rows = first.rows
    assert first.outputs.dtype == np.float32
    np.testing.assert_allclose(first.outputs.sum(axis=1), p[:5000].sum(axis=1), atol=1e-6)
    labels = np.array([r["label"] for r in first.records])
    assert np.all(labels != p[rows].argmax(axis=1))
    np.testing.assert_array_equal(first.outputs[rows].argmax(axis=1), labels)
    untouched = np.setdiff1d(np.arange(5000), rows)
    np.testing.assert_array_equal(first.outputs[untouched], p[untouched])
    assert len(set(labels.tolist())) == 10  # the wrong label is spread over the classes


def test_top_k_limits_the_wrong_label_to_the_top_classes(data) -> None:
    x, p = data
    w = DAWN({"rate": 0.05, "top_k": 3}, kind="classifier", secret=KEY)
    marked = _mark(w, x[:4000], p[:4000])
    ranks = np.argsort(-p[marked.rows], axis=1)[:, 1:3]
    labels = np.array([r["label"] for r in marked.records])
    assert np.all((ranks == labels[:, None]).any(axis=1))


def test_evidence_records_hold_the_exact_query(data) -> None:
    x, p = data
    marked = _mark(DAWN({"rate": 0.02}, kind="classifier", secret=KEY), x[:2000], p[:2000])
    record = marked.records[0]
    assert record["query"]["dtype"] == "u8" and len(record["query"]["data"]) == 1048  # 784 bytes
    np.testing.assert_array_equal(decode_query(record["query"]), x[marked.rows[0]])
    odd = np.full((1, 4, 4), 0.3333, np.float32)
    assert encode_query(odd)["dtype"] == "f4"
    np.testing.assert_array_equal(decode_query(encode_query(odd)), odd)
    with pytest.raises(ValueError, match="malformed query"):
        decode_query({"dtype": "u8", "shape": [2, 2], "data": "AAA="})


@pytest.mark.parametrize(("params", "kind", "field"), [
    ({"rate": 0}, "classifier", "rate"), ({"rate": 0.9}, "classifier", "rate"), ({"top_k": 1}, "classifier", "top_k"),
    ({"max_evidence": 0}, "classifier", "max_evidence"), ({"levels": 1}, "classifier", "levels"),
    ({"colour": 1}, "classifier", "colour"), ({}, "encoder", "name"),
])
def test_bad_params_name_the_field(params: dict, kind: str, field: str) -> None:
    with pytest.raises(ParamError) as caught:
        create_watermark("dawn", params, kind=kind, secret=KEY)  # type: ignore[arg-type]
    assert caught.value.param == field
