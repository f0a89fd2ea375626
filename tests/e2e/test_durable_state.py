"""Client state is durable and shared: a `kill -9` loses at most the detection of the answers of
the last `server.detection_commit_ms` (with group commit off: of a client's last answered request;
none with inline detection), and two gateways on one Redis see one client as one client."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from contracts.batch import QueryBatch
from detectors.base import create_detector
from evaluation.data import load_fashion_mnist
from gateway.config import ServerConfig
from gateway.secrets import derive_seed
from gateway.state.memory import MemoryStore
from tests.e2e.conftest import DEMO_SECRET, model_state, protected_config, query
from tests.servers.procs import Proc, start_gateway, start_redis, wait_until

ENCODER = "fashion-encoder"


def _detection_only(data: dict) -> None:
    """Coverage without defenses or watermark, so answers are the clean embeddings the detector hashed."""
    model = data["models"][0]
    model["defenses"] = []
    model.pop("watermark", None)
    model["detectors"] = [{"name": "coverage", "params": {"tables": 20, "bits": 12, "alert_coverage": 3}}]


def _expected_coverage(answers: list[np.ndarray]) -> float:
    detector = create_detector("coverage", {"tables": 20, "bits": 12, "alert_coverage": 3}, store=MemoryStore(),
                               kind="encoder", seed=derive_seed(DEMO_SECRET, "detector", ENCODER, "coverage"))
    verdict = None
    for batch in answers:
        dummy = np.zeros((len(batch), 1, 28, 28), np.float32)
        verdict = detector.observe("x", QueryBatch(model=ENCODER, kind="encoder", inputs=dummy, outputs=batch))
    return float(verdict.figures["coverage"]) if verdict else 0.0


def _config(tmp_path: Path, state: dict, name: str, deferred_max_rows: int | None = None,
            commit_ms: int | None = None) -> Path:
    def edit(data: dict) -> None:
        _detection_only(data)
        if deferred_max_rows is not None:
            data["server"]["deferred_max_rows"] = deferred_max_rows
        if commit_ms is not None:
            data["server"]["detection_commit_ms"] = commit_ms

    return protected_config(tmp_path / f"{name}.yaml", state, models=[ENCODER], edit=edit)


COMMIT_MS = ServerConfig.detection_commit_ms  # the default
LATE_S = 0.5  # how late the gateway's commit timer may fire on a busy CI machine


@pytest.mark.parametrize(("deferred_max_rows", "commit_ms"), [(None, None), (None, 0), (0, None)],
                         ids=["deferred-group-commit", "deferred", "inline"])
def test_kill_9_loses_at_most_the_last_answered_detections(tmp_path: Path, deferred_max_rows: int | None,
                                                           commit_ms: int | None) -> None:
    state = {"name": "sqlite", "params": {"path": str(tmp_path / "state.db")}}
    config = _config(tmp_path, state, "durable", deferred_max_rows, commit_ms)
    proc = start_gateway(config, tmp_path)
    images = load_fashion_mnist("train").images[:20_000]
    answered: list[np.ndarray] = []
    answered_at: list[float] = []
    sent: list[int] = []
    stop = threading.Event()

    def stream() -> None:
        for start in range(0, len(images), 50):
            if stop.is_set():
                return
            sent.append(start)
            try:
                answered.append(query(proc, ENCODER, "grace", images[start:start + 50], batch=50))
                answered_at.append(time.monotonic())
            except Exception:  # noqa: BLE001 - the kill ends the stream
                return

    worker = threading.Thread(target=stream)
    worker.start()
    # Long enough that answers older than a commit span (and its lateness) exist to check.
    wait_until(lambda: len(answered) >= 40 and answered_at[-1] - answered_at[0] > 3 * LATE_S, 120,
               "40 answered requests over 1.5 s", interval=0.05)
    killed_at = time.monotonic()
    proc.stop(signal.SIGKILL)
    stop.set()
    worker.join(timeout=30)
    restarted = start_gateway(config, tmp_path)
    try:
        recorded = model_state(restarted, "grace", ENCODER)
    finally:
        assert restarted.stop() == 0
    n = sum(len(a) for a in answered)
    # A request the gateway recorded but whose answer the kill swallowed may count too: state is
    # made durable before the answer leaves, and no server can know that an answer arrived.
    in_flight = images[sent[-1]:sent[-1] + 50] if len(sent) > len(answered) else None
    candidates = {(n, round(_expected_coverage(answered), 6))}
    if in_flight is not None:
        import torch

        from evaluation.zoo import load_victim

        with torch.inference_mode():
            extra = load_victim(ENCODER)(torch.from_numpy(np.ascontiguousarray(in_flight))).numpy()
        candidates.add((n + len(in_flight), round(_expected_coverage([*answered, extra]), 6)))
    if deferred_max_rows is None:
        # Deferred detection (requests of <= 64 rows): a request is detected just after its answer
        # left, and the client's next request waits for that, so only the last answer's detection
        # can be lost; with group commit, those of the answers of the last commit span.
        recent = answered_at[-1] if commit_ms == 0 else killed_at - COMMIT_MS / 1000 - LATE_S
        kept = min([i for i, at in enumerate(answered_at) if at >= recent], default=len(answered))
        for k in range(kept, len(answered)):
            candidates.add((sum(len(a) for a in answered[:k]), round(_expected_coverage(answered[:k]), 6)))
    assert (int(recorded["queries"]), round(recorded["coverage"], 6)) in candidates, (recorded, candidates)


def test_two_gateways_on_one_redis_share_a_client(tmp_path: Path) -> None:
    redis = start_redis(tmp_path)
    state = {"name": "redis", "params": {"url": redis.info["url"]}}
    gateways: list[Proc] = [start_gateway(_config(tmp_path, state, f"replica{i}"), tmp_path) for i in range(2)]
    try:
        images = load_fashion_mnist("train").images[:2000]
        answers = [query(gateways[i % 2], ENCODER, "grace", images[s:s + 100], batch=100)
                   for i, s in enumerate(range(0, len(images), 100))]
        expected = _expected_coverage(answers)
        states = [model_state(g, "grace", ENCODER) for g in gateways]
        for state_seen in states:
            assert int(state_seen["queries"]) == 2000
            assert state_seen["coverage"] == pytest.approx(expected, abs=1e-9)
            assert state_seen["status"] == "flagged", state_seen
    finally:
        for gateway in gateways:
            assert gateway.stop() == 0
        redis.stop()
