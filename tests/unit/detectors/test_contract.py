"""The detector contract, checked for every registered detector: verdict ranges, determinism under the
seed, read-only ``peek``, state kept in the store only, build-time ``ParamError`` and no grpc import."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import detectors.coverage
import detectors.prada  # noqa: F401  (registers "prada")
from contracts.batch import ModelKind, QueryBatch, Verdict
from contracts.params import ParamError
from detectors.base import DETECTORS, Detector, create_detector
from detectors.coverage import LSHHasher
from gateway.state.memory import MemoryStore

MODEL = "m"


@dataclass(frozen=True)
class Builder:
    """Small parameters that make a detector reach its interesting states within a short stream."""

    params: Mapping[str, Any]
    bad: list[tuple[dict[str, Any], str]] = field(default_factory=list)


BUILDERS: dict[str, Builder] = {
    "coverage": Builder(
        params={"tables": 4, "bits": 6},
        bad=[({"tables": 0}, "tables"), ({"bits": 40}, "bits"), ({"bits": 6.5}, "bits"),
             ({"source": "logits"}, "source"), ({"alert_coverage": 150}, "alert_coverage"),
             ({"pixel_center": "half"}, "pixel_center"), ({"tabels": 3}, "tabels")],
    ),
    "prada": Builder(
        params={"min_samples": 20, "projection_dim": 16, "test_every": 1},
        bad=[({"delta": 1.0}, "delta"), ({"delta": 0}, "delta"), ({"min_samples": 2}, "min_samples"),
             ({"projection_dim": -1}, "projection_dim"), ({"max_per_class": 0}, "max_per_class"),
             ({"max_distances": 5}, "max_distances"), ({"test_every": True}, "test_every"),
             ({"test_fraction": 2}, "test_fraction"), ({"repeat_tolerance": -0.01}, "repeat_tolerance"),
             ({"repeat_tolerance": 0.6}, "repeat_tolerance"), ({"window": 3}, "window")],
    ),
}
CASES = [(name, kind) for name in sorted(BUILDERS) for kind in ("classifier", "encoder")]


def make_stream(kind: ModelKind, batches: int = 12, size: int = 25, seed: int = 0) -> list[QueryBatch]:
    """Synthetic batches: images float32 [size,1,8,8] in [0,1], softmax outputs [size,10] (classifier)
    or embeddings [size,16] (encoder), classifier features [size,16]."""
    rng = np.random.default_rng(seed)
    stream = []
    for _ in range(batches):
        images = rng.random((size, 1, 8, 8), dtype=np.float32)
        feats = rng.standard_normal((size, 16)).astype(np.float32)
        if kind == "classifier":
            logits = rng.standard_normal((size, 10)).astype(np.float32) * 3
            probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            stream.append(QueryBatch(MODEL, kind, images, probs.astype(np.float32), feats))
        else:
            stream.append(QueryBatch(MODEL, kind, images, feats, None))
    return stream


def build(name: str, kind: ModelKind, store: MemoryStore, seed: int = 7) -> Detector:
    return create_detector(name, BUILDERS[name].params, store=store, kind=kind, seed=seed)


def run(detector: Detector, stream: list[QueryBatch], client: str = "alice") -> list[Verdict]:
    return [detector.observe(client, batch) for batch in stream]


class ReadOnlyStore(MemoryStore):
    """A memory store that fails any write: proves ``peek`` only reads."""

    def __init__(self, inner: MemoryStore) -> None:
        self.__dict__.update(inner.__dict__)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("peek wrote to the store")

    set_bits = incr = set_fields = push_rows = append_record = delete = _refuse  # type: ignore[assignment]


def test_registry_names_are_all_covered() -> None:
    assert set(DETECTORS.names()) == set(BUILDERS)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_verdicts_are_in_range_and_finite(name: str, kind: ModelKind) -> None:
    detector = build(name, kind, MemoryStore())
    assert isinstance(detector, Detector) and detector.name == name
    verdicts = run(detector, make_stream(kind))
    for verdict in verdicts:
        assert verdict.detector == name
        assert 0.0 <= verdict.score <= 1.0
        assert isinstance(verdict.alert, bool)
        assert all(math.isfinite(v) for v in verdict.figures.values()), verdict.figures
    assert verdicts[-1].figures["queries"] == 12 * 25
    if name == "prada":  # enough samples for the test by the end of the stream
        assert 0.0 < verdicts[-1].figures["shapiro_w"] <= 1.0
    if name == "coverage":
        assert 0.0 < verdicts[-1].figures["coverage"] <= 100.0


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_deterministic_under_the_seed(name: str, kind: ModelKind) -> None:
    stream = make_stream(kind)
    first = run(build(name, kind, MemoryStore(), seed=11), stream)
    second = run(build(name, kind, MemoryStore(), seed=11), stream)
    assert first == second
    other = run(build(name, kind, MemoryStore(), seed=12), stream)
    assert [v.figures["queries"] for v in other] == [v.figures["queries"] for v in first]


def test_different_seeds_hash_to_different_buckets() -> None:
    x = np.random.default_rng(0).standard_normal((200, 32)).astype(np.float32)
    a = LSHHasher(32, 20, 12, seed=1).buckets(x)
    b = LSHHasher(32, 20, 12, seed=2).buckets(x)
    assert a.shape == (200, 20) and a.dtype == np.int64 and a.min() >= 0 and a.max() < 4096
    assert np.array_equal(a, LSHHasher(32, 20, 12, seed=1).buckets(x))
    assert (a != b).mean() > 0.9


def test_different_seeds_give_different_prada_distances() -> None:
    stream = make_stream("classifier")
    w = [run(build("prada", "classifier", MemoryStore(), seed=s), stream)[-1].figures["shapiro_w"] for s in (1, 2)]
    assert w[0] != w[1]


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_peek_changes_nothing(name: str, kind: ModelKind) -> None:
    stream = make_stream(kind)
    store, plain_store = MemoryStore(), MemoryStore()
    detector, plain = build(name, kind, store), build(name, kind, plain_store)
    assert detector.peek("alice", MODEL).figures["queries"] == 0
    peeking = build(name, kind, ReadOnlyStore(store))
    for batch in stream:
        observed = detector.observe("alice", batch)
        assert peeking.peek("alice", MODEL) == observed
        assert plain.observe("alice", batch) == observed  # peeks changed nothing later observes see
    assert peeking.peek("bob", MODEL).figures["queries"] == 0


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_state_lives_in_the_store(name: str, kind: ModelKind) -> None:
    stream = make_stream(kind)
    whole = run(build(name, kind, MemoryStore()), stream)
    store = MemoryStore()
    halves = run(build(name, kind, store), stream[:6]) + run(build(name, kind, store), stream[6:])
    assert halves == whole
    # Clients and models are separate: a second client starts from scratch.
    other = build(name, kind, store).observe("bob", stream[0])
    assert other == whole[0]
    assert build(name, kind, store).peek("alice", "another-model").figures["queries"] == 0


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_bad_params_name_the_parameter(name: str) -> None:
    for params, param in BUILDERS[name].bad:
        with pytest.raises(ParamError) as info:
            create_detector(name, params, store=MemoryStore(), kind="classifier", seed=0)
        assert info.value.param == param, (params, str(info.value))


def test_unknown_detector_lists_valid_names() -> None:
    with pytest.raises(KeyError, match="coverage, prada"):
        create_detector("seat", {}, store=MemoryStore(), kind="classifier", seed=0)


def test_coverage_embedding_source_needs_embeddings() -> None:
    detector = create_detector("coverage", {"source": "embedding"}, store=MemoryStore(), kind="classifier", seed=0)
    batch = make_stream("classifier", batches=1)[0]
    with pytest.raises(ValueError, match="embedding"):
        detector.observe("alice", QueryBatch(MODEL, "classifier", batch.inputs, batch.outputs, None))


def test_detectors_do_not_import_grpc_or_protobuf() -> None:
    code = ("import sys, detectors.coverage, detectors.prada; "
            "bad = [m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'google.protobuf'))]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                            check=False)
    assert result.returncode == 0, result.stderr + result.stdout
