"""The moat_flagged_clients gauge follows status changes and resets without scanning every client;
per-client bookkeeping stays bounded."""

from __future__ import annotations

from bench.components import demo_batches, demo_protection
from gateway.auth import Client
from gateway.protection import CLIENT_LOCKS
from gateway.state.base import create_store


def _gauge(protection, status: str) -> float:
    return protection._metrics.flagged_clients.labels(model="fashion-encoder", status=status)._value.get()


def test_flagged_count_rises_with_a_thief_and_falls_on_reset() -> None:
    protection = demo_protection("fashion-encoder", create_store("memory", {}))
    batch = demo_batches("fashion-encoder", seed=0)  # Gaussian 128-d answers to a blank image

    for i in range(3):
        protection.protect(Client(f"honest-{i}"), batch(1))
    assert _gauge(protection, "flagged") == 0
    for _ in range(3):
        outcome = protection.protect(Client("thief"), batch(2000))  # random embeddings cover every bucket
    assert outcome.status == "flagged"
    assert _gauge(protection, "flagged") == 1
    protection.protect(Client("thief"), batch(1))  # staying flagged does not count twice
    assert _gauge(protection, "flagged") == 1
    protection.reset("thief")
    protection.protect(Client("honest-0"), batch(1))  # the gauge is refreshed with the next request
    assert _gauge(protection, "flagged") == 0


def test_evicted_standing_is_read_back_from_the_store(monkeypatch) -> None:
    import gateway.admission

    monkeypatch.setattr(gateway.admission, "MAX_SNAPSHOTS", 2)
    protection = demo_protection("fashion-encoder", create_store("memory", {}))
    batch = demo_batches("fashion-encoder", seed=0)  # Gaussian 128-d answers to a blank image

    thief = protection.observe(Client("thief"), batch(6000))
    assert thief.status == "flagged"
    for i in range(3):  # push the thief out of the two-client memory
        protection.observe(Client(f"honest-{i}"), batch(1))
    assert protection.cached("thief") is None
    again = protection.snapshot("thief")  # from the store: status and the detectors' figures
    assert again.status == "flagged"
    assert again.verdicts["coverage"].figures["coverage"] == thief.verdicts["coverage"].figures["coverage"]


def test_detection_locks_stay_bounded_however_many_clients_ask() -> None:
    protection = demo_protection("fashion-encoder", create_store("memory", {}))
    batch = demo_batches("fashion-encoder", seed=0)
    for i in range(3 * CLIENT_LOCKS):
        protection.observe(Client(f"c{i}"), batch(1))
    # One lock per client ever seen grew without bound; clients now share a fixed set.
    assert len(protection._locks) == CLIENT_LOCKS
