"""B4B on the real demo encoder (SimCLR, 128-d) and real Fashion-MNIST test images: the cost function,
noise that repeating or near-duplicating a query cannot average away, per-client spaces that do not
pool, and no loss for a legitimate user's own linear probe."""

from __future__ import annotations

import hashlib
import hmac
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from scipy import stats

from contracts.batch import QueryBatch, Verdict
from defenses.b4b import B4B, _framed, _noise_seed, client_bytes
from defenses.base import DefenseContext, create_defense
from evaluation.data import load_fashion_mnist
from evaluation.zoo import load_victim
from evaluation.zoo_models import embed, linear_probe_accuracy

SECRET = b"b4b-test-secret"


@pytest.fixture(scope="module")
def encoder() -> torch.jit.ScriptModule:
    return load_victim("fashion-encoder")


@pytest.fixture(scope="module")
def defense() -> B4B:
    built = create_defense("b4b", {}, kind="encoder", secret=SECRET)
    assert isinstance(built, B4B)
    return built


def _answer(defense: B4B, client: str, images: np.ndarray, clean: np.ndarray, coverage: float | None) -> np.ndarray:
    """What ``client`` receives for ``images`` [N,1,28,28] with clean embeddings [N,128] at ``coverage`` %."""
    verdicts = {} if coverage is None else {"coverage": Verdict("coverage", 0.5, {"coverage": coverage})}
    context = DefenseContext(client, QueryBatch("fashion-encoder", "encoder", images, clean), verdicts)
    return defense.apply(clean, context)


def _near_duplicates(image: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` copies of ``image`` [1,28,28] with every pixel moved one grey level (±1/255), clipped to [0, 1]."""
    steps = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(n, *image.shape)) / np.float32(255)
    return np.clip(image[None] + steps, 0.0, 1.0).astype(np.float32)


def test_cost_function_matches_the_paper(defense: B4B) -> None:
    assert defense.sigma(0) == 0.0
    assert defense.sigma(50) == pytest.approx(0.005, rel=0.05)
    assert defense.sigma(70) == pytest.approx(0.15, rel=0.05)
    assert defense.sigma(80) == pytest.approx(0.8, rel=0.01)
    values = [defense.sigma(c) for c in range(0, 101, 5)]
    assert values == sorted(values) and values[2] < 1e-5  # negligible for a narrow user (c = 10)
    assert defense.sigma(-3) == 0.0 and defense.sigma(250) == defense.sigma(100)
    assert defense.sigma(float("nan")) == defense.sigma(100)  # a broken coverage figure fails closed


def test_repeated_query_gets_the_identical_answer(encoder: torch.jit.ScriptModule, defense: B4B) -> None:
    image = load_fashion_mnist("test").images[7:8]
    images = np.repeat(image, 100, axis=0)
    clean = embed(encoder, images)
    assert defense.sigma(70) >= 0.1
    answers = _answer(defense, "thief", images, clean, coverage=70)
    np.testing.assert_array_equal(answers, np.repeat(answers[:1], 100, axis=0))
    replica = create_defense("b4b", {}, kind="encoder", secret=SECRET)  # another gateway replica
    np.testing.assert_array_equal(replica.apply(clean, DefenseContext(
        "thief", QueryBatch("fashion-encoder", "encoder", images, clean),
        {"coverage": Verdict("coverage", 1.0, {"coverage": 70})})), answers)
    noise = answers[0] - _answer(defense, "thief", image, clean[:1], coverage=None)[0]
    assert np.linalg.norm(noise) > 0.5  # the noise is really there (σ ≈ 0.15 over 128 dims, times |s|)


def test_averaging_near_duplicates_recovers_nothing(encoder: torch.jit.ScriptModule, defense: B4B) -> None:
    """Mean of 100 answers to near-duplicates vs a single answer, both against the clean, transformed,
    noise-free answer of the original image; fresh noise per call would shrink the error ~10×."""
    rng = np.random.default_rng(0)
    test = load_fashion_mnist("test")
    singles, means, shared = [], [], []
    for i in rng.choice(len(test), 40, replace=False):
        image = test.images[i]
        clean0 = embed(encoder, image[None])
        target = _answer(defense, "thief", image[None], clean0, coverage=None)[0].astype(np.float64)
        dups = _near_duplicates(image, 100, rng)
        clean = embed(encoder, dups)
        answers = _answer(defense, "thief", dups, clean, coverage=70).astype(np.float64)
        singles.append(np.linalg.norm(answers - target, axis=1).mean())
        means.append(np.linalg.norm(answers.mean(axis=0) - target))
        shared.append(np.mean(defense.codes(clean) == defense.codes(clean0)[0]))
    share = float(np.mean(shared))
    print(f"near-duplicates sharing the LSH code at code_bits={defense.code_bits}: {share:.1%}; "
          f"mean-of-100 error / single error = {np.mean(means) / np.mean(singles):.3f}")
    assert share >= 0.9
    assert np.mean(means) >= 0.9 * np.mean(singles)


def test_two_clients_answers_do_not_pool(encoder: torch.jit.ScriptModule, defense: B4B) -> None:
    images = load_fashion_mnist("test").images[:1000]
    clean = embed(encoder, images)
    a = _answer(defense, "alice", images, clean, coverage=10).astype(np.float64)
    b = _answer(defense, "bob", images, clean, coverage=10).astype(np.float64)
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    print(f"mean cosine similarity between two clients' answers: {cosine.mean():+.3f}")
    assert cosine.mean() < 0.5
    own = np.sum(a * clean, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(clean, axis=1))
    assert own.mean() < 0.5  # nor are they close to the clean embedding


def test_each_clients_linear_probe_loses_nothing(encoder: torch.jit.ScriptModule, defense: B4B) -> None:
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    idx = np.random.default_rng(1).permutation(len(train))[:5000]
    xtr, ytr, xte, yte = train.images[idx], train.labels[idx], test.images[5000:], test.labels[5000:]
    etr, ete = embed(encoder, xtr), embed(encoder, xte)
    base = linear_probe_accuracy(etr, ytr, ete, yte)
    report = [f"untransformed {base:.4f}"]
    for client in ("alice", "bob"):
        # The client trains and tests its probe on its own answers, at a narrow user's coverage (10 %).
        acc = linear_probe_accuracy(_answer(defense, client, xtr, etr, coverage=10), ytr,
                                    _answer(defense, client, xte, ete, coverage=10), yte)
        report.append(f"{client} {acc:.4f}")
        assert abs(acc - base) <= 0.005
    print("linear probe accuracy: " + ", ".join(report))


@pytest.mark.parametrize("code_bits", [1, 7, 16, 33, 64])
def test_codes_are_the_sum_of_the_hyperplane_signs_bits(code_bits: int) -> None:
    defense = create_defense("b4b", {"code_bits": code_bits}, kind="encoder", secret=b"s" * 32)
    x = np.random.default_rng(code_bits).standard_normal((50, 24))
    bits = (x @ defense._hyperplanes(24)) > 0
    expected = [sum(1 << j for j in range(code_bits) if row[j]) for row in bits]
    assert [int(c) for c in defense.codes(x)] == expected


def test_kept_clients_get_what_derived_ones_get_and_the_cache_keeps_its_bound() -> None:
    """A client whose transform and noise key are kept answers exactly as one derived afresh
    (``cache_mb: 0`` keeps none), also after being dropped and derived again; the cache holds no
    more clients than ``cache_mb`` allows by :func:`client_bytes` and, with room, keeps them all."""
    rng = np.random.default_rng(3)
    images = np.zeros((4, 1, 28, 28), np.float32)
    kept = create_defense("b4b", {"cache_mb": 1}, kind="encoder", secret=SECRET)
    fresh = create_defense("b4b", {"cache_mb": 0}, kind="encoder", secret=SECRET)
    room = (1 << 20) // client_bytes(128)
    clients = [f"client-{i}" for i in range(room + 50)]
    for client in clients + clients[:3]:  # the first three were dropped by then: derived again
        clean = rng.standard_normal((4, 128)).astype(np.float32)
        np.testing.assert_array_equal(_answer(kept, client, images, clean, 60.0),
                                      _answer(fresh, client, images, clean, 60.0))
    assert kept._clients[128].cache_info().currsize == room
    assert fresh._clients[128].cache_info().currsize == 0
    roomy = create_defense("b4b", {}, kind="encoder", secret=SECRET)
    for client in clients:
        roomy.client_transform(client, 128)
    info = roomy._clients[128].cache_info()
    assert (info.currsize, info.misses) == (len(clients), len(clients))
    for client in clients:
        roomy.client_transform(client, 128)
    assert roomy._clients[128].cache_info().misses == len(clients)  # all kept: none derived again


def test_transform_is_compact_and_exactly_inverted() -> None:
    """The kept transform is float32 scale and shift and a uint8 permutation (128 dims), and the
    owner inverts it exactly in float64: x = (y[:, argsort(perm)] - shift) / scale."""
    transform = create_defense("b4b", {}, kind="encoder", secret=SECRET).client_transform("alice", 128)
    assert transform.scale.dtype == transform.shift.dtype == np.float32 and transform.perm.dtype == np.uint8
    assert sorted(transform.perm.tolist()) == list(range(128))
    assert (np.abs(transform.scale) >= 0.1).all() and (np.abs(transform.scale) <= 1).all()
    x = np.random.default_rng(4).standard_normal((6, 128))
    y = transform(x)
    back = (y[:, np.argsort(transform.perm)] - transform.shift) / transform.scale
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-12)


def test_one_row_gets_the_noise_it_gets_in_a_batch() -> None:
    defense = create_defense("b4b", {}, kind="encoder", secret=b"s" * 32)
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    together = defense.noise(x, "alice")
    for i in range(5):
        np.testing.assert_array_equal(defense.noise(x[i:i + 1], "alice"), together[i:i + 1])


def test_noise_seeds_are_blake2b_keyed_by_the_hmac_of_secret_and_client() -> None:
    """A row's noise seed is BLAKE2b, keyed by HMAC(secret, [b"b4b/noise", client]), of its code:
    for clients of any length and codes of any width, whether the client's key was kept or not."""
    for cache_mb in (0, 1):
        defense = create_defense("b4b", {"cache_mb": cache_mb}, kind="encoder", secret=SECRET)
        for client in ("a", "alice", "x" * 300):
            key = hmac.new(SECRET, _framed(b"b4b/noise", client.encode()), hashlib.sha256).digest()
            for code in (0, 1, 0xBEEF, 2**64 - 1):
                expected = hashlib.blake2b(code.to_bytes(8, "big"), key=key, digest_size=32).digest()
                assert _noise_seed(defense._client(client, 16).noise_key, code) == expected


def test_noise_is_standard_normal_and_per_thread_streams_do_not_mix() -> None:
    """Rows keyed by distinct codes are independent N(0, 1) draws; computed on several threads at
    once (each re-keys its own generator) they equal the single-threaded ones."""
    defense = create_defense("b4b", {"code_bits": 64}, kind="encoder", secret=SECRET)
    x = np.random.default_rng(1).standard_normal((2000, 64))
    noise = defense.noise(x, "alice")
    assert stats.kstest(noise.ravel(), "norm").pvalue > 1e-3
    assert abs(np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]) < 0.1
    rows = [x[i:i + 1] for i in range(200)]
    alone = [defense.noise(r, "alice") for r in rows]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda r: defense.noise(r, "alice"), rows))
    for a, b in zip(alone, threaded, strict=True):
        np.testing.assert_array_equal(a, b)
