"""Wrapper arithmetic: the sybil mapping step, the averaging proxy, and their params. (Against a real
gateway: tests/e2e/test_eval_client.py and tests/e2e/test_evaluate.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.attacks import create_attack
from evaluation.attacks.wrappers import MappedPool, _Averaged, fit_affine
from evaluation.client import Refused


def test_fit_affine_recovers_a_per_key_affine_transform() -> None:
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(300, 16)).astype(np.float32)
    scale, shift = rng.uniform(-1, 1, 16), rng.uniform(-1, 1, 16)
    perm = rng.permutation(32)
    pad = rng.normal(size=16)
    other = np.hstack([clean * scale + shift, np.tile(pad, (300, 1))])[:, perm]  # B4B's affine+shuffle
    w = fit_affine(other, clean)
    fresh = rng.normal(size=(50, 16)).astype(np.float32)
    mapped = np.hstack([np.hstack([fresh * scale + shift, np.tile(pad, (50, 1))])[:, perm], np.ones((50, 1))]) @ w
    assert np.abs(mapped - fresh).max() < 1e-2


class Echo:
    """A victim stand-in that answers each image with its mean pixel and counts queries."""

    def __init__(self, limit: int | None = None) -> None:
        self.queries, self.refused_after, self.limit = 0, None, limit

    def query(self, x: np.ndarray) -> np.ndarray:
        answers = x.reshape(len(x), -1).mean(1, keepdims=True).repeat(2, 1).astype(np.float32)
        if self.limit is not None and self.queries + len(x) > self.limit:
            room = self.limit - self.queries
            self.queries, self.refused_after = self.limit, self.limit
            raise Refused("PERMISSION_DENIED", "blocked", answers[:room])
        self.queries += len(x)
        return answers


def test_averaging_sends_repeats_and_returns_their_mean() -> None:
    victim = Echo()
    proxy = _Averaged(victim, repeats=4, jitter=0.0, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).random((5, 1, 4, 4), dtype=np.float32)
    out = proxy.query(x)
    assert out.shape == (5, 2) and victim.queries == 20
    np.testing.assert_allclose(out[:, 0], x.reshape(5, -1).mean(1), rtol=1e-5)


def test_averaging_keeps_only_whole_groups_of_a_refused_batch() -> None:
    proxy = _Averaged(Echo(limit=10), repeats=4, jitter=0.05, rng=np.random.default_rng(0))
    with pytest.raises(Refused) as caught:
        proxy.query(np.zeros((5, 1, 4, 4), np.float32))
    assert caught.value.partial.shape == (2, 2)


class TwoKeys:
    """A pool stand-in whose key 1 answers in a shifted space."""

    def __init__(self) -> None:
        self.queries, self.refused_after = 0, None
        self.last_keys = np.zeros(0, np.int64)

    def query(self, x: np.ndarray) -> np.ndarray:
        self.last_keys = np.arange(len(x)) % 2
        answers = x.reshape(len(x), -1)[:, :3].astype(np.float32)
        answers[self.last_keys == 1] = 2 * answers[self.last_keys == 1] + 1
        self.queries += len(x)
        return answers


def test_mapped_pool_maps_each_keys_answers_into_key_zeros_space() -> None:
    pool = TwoKeys()
    rng = np.random.default_rng(0)
    anchors = rng.random((60, 1, 2, 2), dtype=np.float32)
    key0 = anchors.reshape(60, -1)[:, :3]
    w = fit_affine(2 * key0 + 1, key0)
    x = rng.random((10, 1, 2, 2), dtype=np.float32)
    out = MappedPool(pool, [None, w]).query(x)  # type: ignore[arg-type]
    np.testing.assert_allclose(out, x.reshape(10, -1)[:, :3], atol=1e-3)


@pytest.mark.parametrize(("name", "params", "message"), [
    ("sybil", {"attack": "knockoff", "keys": 1}, "sybil.keys must be >= 2"),
    ("sybil", {"attack": "sybil"}, "sybil.attack must name a base attack"),
    ("sybil", {"attack": "knockoff", "mapping": "maybe"}, "sybil.mapping must be one of"),
    ("averaging", {"attack": "knockoff", "repeats": 1}, "averaging.repeats must be >= 2"),
    ("averaging", {"attack": "knockoff", "jitter": 0.9}, "averaging.jitter must be in [0, 0.5]"),
    ("averaging", {"attack": "knockoff", "attack_params": {"labels": "fuzzy"}}, "knockoff.labels must be one of"),
])
def test_bad_wrapper_params_name_the_param(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        create_attack(name, params, seed=0)
    assert message in str(caught.value)


def test_sybil_asks_for_as_many_keys_as_it_splits_over() -> None:
    assert create_attack("sybil", {"attack": "knockoff", "keys": 5}, seed=0).keys == 5
