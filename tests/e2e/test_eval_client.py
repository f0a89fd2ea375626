"""The evaluation clients against a real gateway: refusals (blocked, throttled, unknown key) surface as
``Refused`` with the answered part kept; a key pool spreads batches round-robin and retires refused
keys; the sybil mapping step recovers one answer space from B4B's per-key transforms."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import yaml

from evaluation.attacks.wrappers import MappedPool, learn_maps
from evaluation.client import KeyPool, Refused, VictimClient
from evaluation.data import load_fashion_mnist
from evaluation.presets import (
    ADMIN_TOKEN,
    DEMO_CONFIG,
    api_key,
    gateway_config,
    start_gateway,
)
from evaluation.suite import ModelEntry
from gateway.admin_client import AdminClient

CLIENTS = ["blocked", "throttled", "patient", "pool-0", "pool-1", "pool-2", "spread-0", "spread-1", "spread-2",
           "sybil-0", "sybil-1"]


def _model(name: str, zoo: str, kind: str, dim: int) -> ModelEntry:
    return ModelEntry(name=name, kind=kind, source={"zoo": zoo}, input_shape=(1, 28, 28), num_outputs=dim,
                      data={}, attacks=(), benign=())


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One gateway: ``blocking`` blocks a client after its first batch (coverage alert at 0.01%),
    ``throttling`` throttles to 2 requests/s, ``fashion-encoder`` has the demo's B4B protection."""
    out = tmp_path_factory.mktemp("eval-client")
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    encoder = next(m for m in demo["models"] if m["kind"] == "encoder")
    coverage = {"name": "coverage", "params": {"source": "embedding", "alert_coverage": 0.01}}
    custom = {"models": [
        {"name": "blocking", "kind": "classifier", "detectors": [coverage], "policy": {"block_at": 1.0}},
        {"name": "throttling", "kind": "classifier", "detectors": [coverage],
         "policy": {"throttle_at": 1.0, "throttle_per_second": 2}},
        {"name": "fashion-encoder", "kind": "encoder",
         **{k: encoder[k] for k in ("detectors", "defenses", "policy")}},
    ]}
    (out / "custom.yaml").write_text(yaml.safe_dump(custom))
    models = [_model("blocking", "fashion-classifier", "classifier", 10),
              _model("throttling", "fashion-classifier", "classifier", 10),
              _model("fashion-encoder", "fashion-encoder", "encoder", 128)]
    config = gateway_config(models, {"name": "custom", "config": str(out / "custom.yaml")}, CLIENTS, out)
    proc = start_gateway(config, out)
    yield proc.address, f"127.0.0.1:{proc.ports['admin']}"
    proc.stop()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_fashion_mnist("test").images[:1200]


def test_blocked_client_gets_refused_with_the_answered_part(gateway, images) -> None:
    client = VictimClient(gateway[0], "blocking", api_key("blocked"), batch=100)
    with pytest.raises(Refused) as caught:
        client.query(images[:300])
    assert caught.value.code == "PERMISSION_DENIED"
    assert caught.value.partial.shape == (100, 10)
    assert client.queries == 100 and client.refused_after == 100
    with pytest.raises(Refused):
        client.query(images[:10])
    assert client.queries == 100 and client.refused_after == 100


def test_throttled_client_gives_up_or_waits_for_the_hint(gateway, images) -> None:
    impatient = VictimClient(gateway[0], "throttling", api_key("throttled"), batch=50)
    with pytest.raises(Refused) as caught:
        impatient.query(images[:500])
    assert caught.value.code == "RESOURCE_EXHAUSTED"
    assert 50 <= impatient.refused_after < 500
    patient = VictimClient(gateway[0], "throttling", api_key("patient"), batch=50, throttle_wait_s=30)
    assert patient.query(images[:400]).shape == (400, 10)
    assert patient.refused_after is None and patient.waited_s > 0


def test_unknown_key_is_refused_as_unauthenticated(gateway, images) -> None:
    with pytest.raises(Refused) as caught:
        VictimClient(gateway[0], "blocking", "not-a-key").query(images[:5])
    assert caught.value.code == "UNAUTHENTICATED"


def test_key_pool_spreads_batches_round_robin(gateway, images) -> None:
    pool = KeyPool(gateway[0], "fashion-encoder", [api_key(f"spread-{k}") for k in range(3)], batch=100)
    answers = pool.query(images[:700])
    assert answers.shape == (700, 128)
    assert pool.last_keys.tolist() == [k for k in (0, 1, 2, 0, 1, 2, 0) for _ in range(100)]
    with AdminClient(gateway[1], ADMIN_TOKEN) as admin:
        counts = [int(next(m for m in admin.get_client(f"spread-{k}")["models"]
                           if m["model"] == "fashion-encoder")["queries"]) for k in range(3)]
    assert counts == [300, 200, 200]
    assert pool.queries == 700


def test_key_pool_retires_refused_keys_then_gives_up(gateway, images) -> None:
    pool = KeyPool(gateway[0], "blocking", [api_key(f"pool-{k}") for k in range(3)], batch=100)
    with pytest.raises(Refused) as caught:
        pool.query(images[:900])
    assert caught.value.partial.shape == (300, 10)
    assert pool.queries == 300 and pool.refused_after == 300 and pool.live == []


def test_sybil_mapping_puts_two_keys_in_one_answer_space(gateway, images) -> None:
    pool = KeyPool(gateway[0], "fashion-encoder", [api_key("sybil-0"), api_key("sybil-1")], batch=100)
    held_out = images[400:600]
    first, second = pool.clients[0].query(held_out), pool.clients[1].query(held_out)

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
        return float((a * b).sum(1).mean())

    assert cosine(first, second) < 0.5  # B4B answers each key in its own space
    mapped = MappedPool(pool, learn_maps(pool, images[:400]))
    answers = mapped.query(held_out)
    from_second = answers[mapped.pool.last_keys == 1]
    assert from_second.shape == (100, 128)
    assert cosine(from_second, first[100:200]) > 0.95
    assert pool.queries == 2 * 200 + 2 * 400 + 200
