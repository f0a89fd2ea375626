"""DAWN on real Fashion-MNIST images and the demo classifier: selection rate, keying, robustness to
near-duplicates, consistent wrong labels, distributions kept; the compact query encoding. The
direction watermark on the demo encoder: the same properties, norms kept, and ``verify_encoder``
on synthetic suspects."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.batch import QueryBatch
from contracts.params import ParamError
from defenses.base import DefenseContext
from defenses.watermark import (
    DAWN,
    Direction,
    create_watermark,
    decode_query,
    encode_query,
)
from evaluation.data import load_fashion_mnist
from evaluation.zoo import load_victim
from evaluation.zoo_models import embed
from gateway.evidence import EvidenceFile
from gateway.verify import VerifyError, verify

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


def test_verify_classifier_counts_a_repeated_query_once(data) -> None:
    """A suspect that answers the watermark label on one evidence query only: asking that query 30
    more times adds records but no matches (records of one code and label are one observation)."""
    x, p = data
    marked = _mark(DAWN({"rate": 0.02}, kind="classifier", secret=KEY), x[:4000], p[:4000])
    records = marked.records
    first = records[0]
    evidence = EvidenceFile(model="clf", kind="classifier", client="erin", watermark={"name": "dawn", "params": {}},
                            records=tuple(records) + (first,) * 30)
    target = decode_query(first["query"]).tobytes()

    def suspect(q: np.ndarray) -> np.ndarray:  # the clean answers, but the mark on the first query
        out = embed(load_victim("fashion-classifier"), q)
        for i, row in enumerate(q):
            if row.tobytes() == target:
                out[i] = np.eye(out.shape[1])[first["label"]]
        return out

    result = verify(evidence, suspect)
    assert result["records"] == len(records) + 30 and result["n"] <= len(records)
    assert result["matches"] <= 2 and result["verdict"] == "not-proven", result


# --- direction: the encoder watermark -------------------------------------------------------------

@pytest.fixture(scope="module")
def encoded() -> tuple[np.ndarray, np.ndarray]:
    images = load_fashion_mnist("train").images[:20_000]
    return images, embed(load_victim("fashion-encoder"), images)


def _turn(w: Direction, x: np.ndarray, e: np.ndarray, client: str = "alice"):
    return w.mark(e, DefenseContext(client, QueryBatch("enc", "encoder", x, e)))


def _evidence(records) -> EvidenceFile:
    return EvidenceFile(model="enc", kind="encoder", client="erin", watermark={"name": "direction", "params": {}},
                        records=tuple(records))


@pytest.mark.parametrize(("params", "kind", "field"), [
    ({"rate": 0}, "encoder", "rate"), ({"rate": 0.6}, "encoder", "rate"), ({"rate": "high"}, "encoder", "rate"),
    ({"levels": 1}, "encoder", "levels"), ({"levels": 17}, "encoder", "levels"),
    ({"strength": 0}, "encoder", "strength"), ({"strength": -1.0}, "encoder", "strength"),
    ({"max_evidence": 0}, "encoder", "max_evidence"), ({"max_evidence": 2.5}, "encoder", "max_evidence"),
    ({"top_k": 3}, "encoder", "top_k"), ({}, "classifier", "name"),
])
def test_direction_bad_params_name_the_field(params: dict, kind: str, field: str) -> None:
    with pytest.raises(ParamError) as caught:
        create_watermark("direction", params, kind=kind, secret=KEY)  # type: ignore[arg-type]
    assert caught.value.param == field


def test_direction_selection_rate_is_close_to_r_and_keyed(encoded) -> None:
    x, _ = encoded
    for rate in (0.005, 0.02):
        chosen = Direction({"rate": rate}, kind="encoder", secret=KEY).selected(x)
        # Codes shared by several images (the largest holds 1% of them) widen the binomial spread.
        assert abs(chosen.mean() - rate) < 0.35 * rate, (rate, chosen.mean())
    a = Direction({"rate": 0.02}, kind="encoder", secret=KEY).selected(x)
    b = Direction({"rate": 0.02}, kind="encoder", secret=b"another-key-0123456789").selected(x)
    assert (a & b).sum() < 0.1 * a.sum()


def test_direction_near_duplicates_keep_selection_and_answer(encoded) -> None:
    x, e = encoded
    w = Direction({"rate": 0.05}, kind="encoder", secret=KEY)
    chosen = np.nonzero(w.selected(x))[0][:300]
    rng = np.random.default_rng(0)
    jitter = np.clip(x[chosen] + rng.choice([-1, 1], x[chosen].shape) / 255, 0, 1).astype(np.float32)
    kept = w.selected(jitter)
    assert kept.mean() > 0.9, kept.mean()
    # A jittered query whose code changed can still be selected (5% of codes are), with another u.
    same = np.all(w.directions(jitter[kept], 128) == w.directions(x[chosen][kept], 128), axis=1)
    assert same.mean() > 0.97, same.mean()


def test_direction_answers_are_consistent_turned_and_keep_the_norm(encoded) -> None:
    x, e = encoded
    w = Direction({"rate": 0.02}, kind="encoder", secret=KEY)
    first, again = _turn(w, x[:5000], e[:5000]), _turn(w, x[:5000], e[:5000], client="bob")
    rows = first.rows
    assert 50 < len(rows) < 150 and len(first.records) == len(rows)
    np.testing.assert_array_equal(first.outputs, again.outputs)  # same query, same answer, any client
    assert first.outputs.dtype == np.float32 and first.outputs.shape == e[:5000].shape
    untouched = np.setdiff1d(np.arange(5000), rows)
    np.testing.assert_array_equal(first.outputs[untouched], e[untouched])
    np.testing.assert_allclose(np.linalg.norm(first.outputs, axis=1), np.linalg.norm(e[:5000], axis=1), rtol=1e-5)
    u = w.directions(x[rows], 128)
    unit = first.outputs[rows] / np.linalg.norm(first.outputs[rows], axis=1, keepdims=True)
    clean = e[rows] / np.linalg.norm(e[rows], axis=1, keepdims=True)
    cos_u, cos_clean = np.sum(unit * u, axis=1), np.sum(unit * clean, axis=1)
    # Strength 1 bisects ê and u (nearly orthogonal at D = 128): ~45° from each.
    assert np.all(np.abs(cos_u - cos_clean) < 1e-5) and np.all((cos_u > 0.6) & (cos_u < 0.8)), cos_u
    assert abs(float(np.mean(np.sum(clean * u, axis=1)))) < 0.03  # u is unrelated to the clean answer


def test_direction_records_hold_the_query_direction_and_answer(encoded) -> None:
    x, e = encoded
    w = Direction({"rate": 0.02}, kind="encoder", secret=KEY)
    marked = _turn(w, x[:2000], e[:2000])
    record, row = marked.records[0], marked.rows[0]
    assert set(record) == {"time", "query", "answer", "clean", "direction", "clean_cos"}
    np.testing.assert_allclose(record["clean"], e[row], atol=1e-6)
    np.testing.assert_array_equal(decode_query(record["query"]), x[row])
    np.testing.assert_allclose(record["answer"], marked.outputs[row], atol=1e-6)
    u = w.directions(x[row:row + 1], 128)[0]
    np.testing.assert_allclose(record["direction"], u, atol=1e-7)
    assert abs(record["clean_cos"] - float(e[row] @ u / np.linalg.norm(e[row]))) < 1e-6


def _marked_evidence(encoded, n: int = 10_000):
    x, e = encoded
    w = Direction({"rate": 0.005}, kind="encoder", secret=KEY)
    marked = _turn(w, x[:n], e[:n])
    return _evidence(marked.records), marked


def test_verify_encoder_finds_a_copy_of_the_answers_and_clears_others(encoded) -> None:
    x, e = encoded
    evidence, marked = _marked_evidence(encoded)
    answers = {x[i].tobytes(): marked.outputs[i] for i in marked.rows}
    stolen = verify(evidence, lambda q: np.stack([answers[row.tobytes()] for row in q]))
    assert stolen["verdict"] == "stolen" and stolen["p_value"] < 1e-10 and stolen["matches"] == stolen["n"], stolen
    assert 25 <= stolen["n"] <= 80 and stolen["p0"] == 0.5 and stolen["mean_cos"] > 0.6
    victim = load_victim("fashion-encoder")
    for seed in range(5):
        mix = np.random.default_rng(seed).standard_normal((128, 128)).astype(np.float32)
        clean = verify(evidence, lambda q, mix=mix: embed(victim, q) @ mix)  # the victim, linearly remapped
        assert clean["verdict"] == "not-proven" and clean["p_value"] > 0.01, clean


def test_verify_encoder_false_positive_rate_is_below_alpha(encoded) -> None:
    """Under H0 (a suspect independent of the key) the p-value is conservative: over 200 keys, a
    linearly remapped victim is found `stolen` at α = 0.05 at most 5% of the time."""
    x, e = encoded[0][:2000], encoded[1][:2000]
    mix = np.random.default_rng(7).standard_normal((128, 128))
    suspect = {q.tobytes(): z for q, z in zip(x, e @ mix, strict=True)}
    p_values = []
    for k in range(200):
        marked = _turn(Direction({"rate": 0.05}, kind="encoder", secret=b"null-key-%d" % k), x, e)
        result = verify(_evidence(marked.records), lambda q: np.stack([suspect[row.tobytes()] for row in q]), 0.05)
        p_values.append(result["p_value"])
    assert np.mean(np.array(p_values) < 0.05) <= 0.05, sorted(p_values)[:12]


def test_verify_encoder_does_not_accuse_the_unwatermarked_victim(encoded) -> None:
    """The victim's own clean answers are not a copy of the watermarked ones: what is left of them
    after the recorded clean answer is rounding noise, unrelated to the directions."""
    evidence, _ = _marked_evidence(encoded)
    result = verify(evidence, lambda q: embed(load_victim("fashion-encoder"), q))
    assert result["verdict"] == "not-proven" and result["p_value"] > 0.05, result
    assert result["answer_cos"] == pytest.approx(np.mean([r["clean_cos"] for r in evidence.records]), abs=0.01)


def test_verify_encoder_counts_a_repeated_query_once(encoded) -> None:
    """A suspect that carries the mark on one query only: sending that query 20 more times adds
    records but no evidence (records of one direction are one observation)."""
    evidence, _ = _marked_evidence(encoded)
    first = evidence.records[0]
    answers = {decode_query(r["query"]).tobytes(): np.asarray(r["clean"], np.float32) for r in evidence.records}
    answers[decode_query(first["query"]).tobytes()] = np.asarray(first["answer"], np.float32)

    def suspect(q: np.ndarray) -> np.ndarray:
        return np.stack([answers[row.tobytes()] for row in q])

    once, repeated = verify(evidence, suspect), verify(_evidence(evidence.records + (first,) * 20), suspect)
    assert repeated["records"] == once["records"] + 20 and repeated["n"] == once["n"]
    assert repeated["p_value"] == pytest.approx(once["p_value"]) and once["verdict"] == "not-proven"


def test_verify_encoder_rejects_unusable_answers(encoded) -> None:
    evidence, _ = _marked_evidence(encoded)
    with pytest.raises(VerifyError, match="dimension 64.*dimension 128"):
        verify(evidence, lambda q: np.ones((len(q), 64), np.float32))
    with pytest.raises(VerifyError, match="NaN"):
        verify(evidence, lambda q: np.full((len(q), 128), np.nan, np.float32))
    with pytest.raises(VerifyError, match="expected shape"):
        verify(evidence, lambda q: np.ones((len(q) + 1, 128), np.float32))
    broken = _evidence([{**evidence.records[0], "direction": [1.0, "x"]}])
    with pytest.raises(VerifyError, match="field 'direction' must hold numbers"):
        verify(broken, lambda q: np.ones((len(q), 2), np.float32))
