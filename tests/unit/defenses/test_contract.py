"""The defense contract, checked for every registered defense on synthetic answers: shape and dtype
kept, classifier rows stay distributions, inputs untouched, keyed determinism, ParamError naming the
parameter, the wrong model kind refused, and no grpc/protobuf import."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from contracts.batch import ModelKind, QueryBatch, Verdict
from contracts.params import ParamError
from defenses import b4b, misinformation, perturbations  # noqa: F401  (register themselves)
from defenses.base import DEFENSES, Defense, DefenseContext, create_defense

ROOT = Path(__file__).resolve().parents[3]
SECRET = b"contract-test-secret"
#: Every registered defense and the model kind it protects; the first test keeps this exhaustive.
KINDS: dict[str, ModelKind] = {
    "b4b": "encoder",
    "reverse_sigmoid": "classifier",
    "rounding": "classifier",
    "top_k": "classifier",
    "label_only": "classifier",
    "misinformation": "classifier",
}
#: Defenses whose answers depend on the secret (and the client).
KEYED = {"b4b", "misinformation"}
BAD_PARAMS: list[tuple[str, dict[str, Any], str]] = [
    ("b4b", {"transform": "rotate"}, "transform"),
    ("b4b", {"alpha": 0}, "alpha"),
    ("b4b", {"beta": -5}, "beta"),
    ("b4b", {"lam": 0.9}, "lam"),  # not below alpha: the cost would not grow with coverage
    ("b4b", {"code_bits": 0}, "code_bits"),
    ("b4b", {"code_bits": 65}, "code_bits"),
    ("b4b", {"code_bits": 8.5}, "code_bits"),
    ("b4b", {"sigma": 0.1}, "sigma"),
    ("b4b", {"cache_mb": -1}, "cache_mb"),
    ("b4b", {"cache_mb": "64"}, "cache_mb"),
    ("reverse_sigmoid", {"beta": 0}, "beta"),
    ("reverse_sigmoid", {"gamma": "0.1"}, "gamma"),
    ("reverse_sigmoid", {"when": "sometimes"}, "when"),
    ("rounding", {"decimals": -1}, "decimals"),
    ("rounding", {"decimals": 7}, "decimals"),
    ("rounding", {"decimals": 2.0}, "decimals"),
    ("top_k", {"k": 0}, "k"),
    ("top_k", {"k": True}, "k"),
    ("label_only", {"k": 1}, "k"),
    ("label_only", {"when": None}, "when"),
    ("misinformation", {"tau": 0}, "tau"),
    ("misinformation", {"tau": 1.5}, "tau"),
    ("misinformation", {"nu": -1}, "nu"),
    ("misinformation", {"unflagged": "yes"}, "unflagged"),
]


def _batch(kind: ModelKind, n: int, seed: int = 0) -> QueryBatch:
    """Synthetic answers: classifier rows from flat to one-hot (exact zeros included); encoder rows N(0, 1)."""
    rng = np.random.default_rng(seed)
    inputs = rng.random((n, 1, 28, 28), dtype=np.float32)
    if kind == "encoder":
        return QueryBatch("enc", kind, inputs, rng.standard_normal((n, 32)).astype(np.float32))
    probs = rng.dirichlet(np.full(10, 0.3), size=n)
    probs[::4] = rng.dirichlet(np.full(10, 50.0), size=len(probs[::4]))  # flat rows: low confidence
    if n > 1:
        probs[1] = np.eye(10)[3]
    return QueryBatch("clf", kind, inputs, probs.astype(np.float32))


def _context(batch: QueryBatch, client: str = "alice", flagged: bool = True) -> DefenseContext:
    verdicts = {"coverage": Verdict("coverage", 1.0, {"coverage": 75.0}, alert=True)}
    return DefenseContext(client, batch, verdicts, suspicion=1.0 if flagged else 0.0, flagged=flagged)


def _build(name: str, secret: bytes = SECRET, **params: Any) -> Defense:
    return create_defense(name, params, kind=KINDS[name], secret=secret)


def test_builders_cover_exactly_the_registry() -> None:
    assert set(KINDS) == set(DEFENSES.names())
    for name in KINDS:
        assert _build(name).name == name


@pytest.mark.parametrize("n", [0, 1, 16])
@pytest.mark.parametrize("name", sorted(KINDS))
def test_shape_dtype_and_distributions(name: str, n: int) -> None:
    batch = _batch(KINDS[name], n)
    before = batch.outputs.copy()
    out = _build(name).apply(batch.outputs, _context(batch))
    assert isinstance(out, np.ndarray) and out.shape == batch.outputs.shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(batch.outputs, before)  # the clean answer is never written to
    if KINDS[name] == "classifier":
        assert (out >= 0).all()
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_deterministic_and_keyed(name: str) -> None:
    batch = _batch(KINDS[name], 32)
    first = _build(name).apply(batch.outputs, _context(batch))
    again = _build(name).apply(batch.outputs, _context(batch))  # a fresh object, as on another replica
    np.testing.assert_array_equal(first, again)
    other_secret = _build(name, secret=b"another-secret").apply(batch.outputs, _context(batch))
    other_client = _build(name).apply(batch.outputs, _context(batch, client="bob"))
    if name in KEYED:
        assert not np.array_equal(first, other_secret)
        assert not np.array_equal(first, other_client)
    else:
        np.testing.assert_array_equal(first, other_secret)
        np.testing.assert_array_equal(first, other_client)


@pytest.mark.parametrize(("name", "params", "param"), BAD_PARAMS, ids=[f"{n}-{p}" for n, _, p in BAD_PARAMS])
def test_bad_params_name_the_param(name: str, params: dict[str, Any], param: str) -> None:
    with pytest.raises(ParamError) as info:
        _build(name, **params)
    assert info.value.param == param


@pytest.mark.parametrize("name", sorted(KINDS))
def test_wrong_kind_is_refused(name: str) -> None:
    wrong: ModelKind = "classifier" if KINDS[name] == "encoder" else "encoder"
    with pytest.raises(ParamError) as info:
        create_defense(name, {}, kind=wrong, secret=SECRET)
    assert info.value.param == "name"


def test_unknown_defense_lists_the_valid_ones() -> None:
    with pytest.raises(KeyError, match="b4b"):
        create_defense("no-such-defense", {}, kind="classifier", secret=SECRET)


@pytest.mark.parametrize("name", ["reverse_sigmoid", "rounding", "top_k", "label_only"])
def test_when_flagged_touches_flagged_clients_only(name: str) -> None:
    batch = _batch("classifier", 16)
    defense = _build(name, when="flagged")
    np.testing.assert_array_equal(defense.apply(batch.outputs, _context(batch, flagged=False)), batch.outputs)
    assert not np.array_equal(defense.apply(batch.outputs, _context(batch, flagged=True)), batch.outputs)


def test_top_k_checks_k_against_the_classes_when_applied() -> None:
    batch = _batch("classifier", 4)
    defense = _build("top_k", k=11)  # fine at build time: the number of classes is not known yet
    with pytest.raises(ParamError) as info:
        defense.apply(batch.outputs, _context(batch))
    assert info.value.param == "k"


def test_answers_must_be_two_dimensional() -> None:
    for name, kind in KINDS.items():
        batch = _batch(kind, 4)
        with pytest.raises(ValueError, match=r"\[B, "):
            _build(name).apply(batch.outputs[0], _context(batch))


def test_keyed_defenses_need_a_secret() -> None:
    for name in KEYED:
        with pytest.raises(ValueError, match="secret"):
            create_defense(name, {}, kind=KINDS[name], secret=b"")


_NO_GRPC = textwrap.dedent("""
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "grpc" or name.startswith(("grpc.", "google.protobuf")):
                raise ImportError(f"defenses must not import {name}")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    from defenses.base import DEFENSES, DefenseContext, create_defense
    from contracts.batch import QueryBatch, Verdict

    kinds = {"b4b": "encoder"}
    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 28, 28), dtype=np.float32)
    for name in DEFENSES.names() or ["b4b"]:
        kind = kinds.get(name, "classifier")
        out = rng.standard_normal((3, 8)) if kind == "encoder" else rng.dirichlet(np.ones(10), size=3)
        batch = QueryBatch("m", kind, x, out.astype(np.float32))
        ctx = DefenseContext("c", batch, {"coverage": Verdict("coverage", 1.0, {"coverage": 90.0})}, 1.0, True)
        create_defense(name, {}, kind=kind, secret=b"s").apply(batch.outputs, ctx)
    loaded = [m for m in sys.modules if m == "grpc" or m.startswith(("grpc.", "google.protobuf"))]
    if loaded or len(DEFENSES.names()) < 6:
        sys.exit(f"loaded {loaded}; registered {DEFENSES.names()}")
    print("ok")
""")


def test_defenses_import_no_grpc_or_protobuf() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _NO_GRPC], check=False, cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.strip() == "ok"
