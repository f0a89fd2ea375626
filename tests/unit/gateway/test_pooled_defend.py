"""The gateway pools a request's queries while the model computes its answer
(``ModelProtection.pool_queries``); the answer defended with them is the one defend gives alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from contracts.batch import QueryBatch
from bench.components import DEMO_CONFIG, demo_batches, demo_protection
from gateway.auth import Client
from gateway.protection import Snapshot
from gateway.state.base import create_store


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.round(rng.random((n, 1, 28, 28), dtype=np.float32) * 255) / np.float32(255)  # 8-bit


@pytest.mark.parametrize("model", ["fashion-classifier", "fashion-encoder"])
@pytest.mark.parametrize("status", ["ok", "flagged"])
def test_an_answer_defended_with_queries_pooled_ahead_is_the_same(model: str, status: str) -> None:
    protection = demo_protection(model, create_store("memory", {}))
    for tier in protection.tiers.values():
        if tier.watermark is not None:
            tier.watermark.rate = 0.05  # so that a few hundred answers take the marking path too
    rng = np.random.default_rng(4)
    draw = demo_batches(model, seed=4)
    caller = Client("alice")
    snapshot = Snapshot(status=status, suspicion=1.0 if status == "flagged" else 0.0, verdicts={}, taken=0.0)
    marked_any = False
    for size in [1] * 300 + [32] * 10:
        drawn = draw(size)
        batch = QueryBatch(drawn.model, drawn.kind, _images(rng, size), drawn.outputs, embeddings=drawn.embeddings)
        pooled = protection.pool_queries(caller, batch.inputs)
        assert pooled is not None  # both demo models have a watermark that codes every query
        ahead, marked_ahead = protection.defend(caller, batch, snapshot, pooled)
        alone, marked_alone = protection.defend(caller, batch, snapshot)
        assert ahead.tobytes() == alone.tobytes()
        assert (marked_ahead is None) == (marked_alone is None)
        if marked_ahead is not None and marked_alone is not None:
            marked_any = True
            assert marked_ahead.rows.tolist() == marked_alone.rows.tolist()
    assert marked_any


def test_nothing_is_pooled_where_no_defense_codes_queries_or_the_queries_are_no_images(tmp_path: Path) -> None:
    caller, image = Client("alice"), np.zeros((1, 1, 28, 28), np.float32)
    protection = demo_protection("fashion-encoder", create_store("memory", {}))
    assert protection.pool_queries(caller, image) is not None  # its direction watermark codes queries
    assert protection.pool_queries(caller, np.zeros(3, np.float32)) is None  # [B]: no image to pool
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["auth"] = {"keys_file": str(DEMO_CONFIG.parent / "demo-keys.yaml"),
                      "server_secret_file": str(DEMO_CONFIG.parent / "demo-secret")}
    encoder = next(m for m in config["models"] if m["name"] == "fashion-encoder")
    del encoder["watermark"]  # b4b alone: it codes answers, not queries
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as patch:
        patch.setattr("bench.components.DEMO_CONFIG", path)
        unwatermarked = demo_protection("fashion-encoder", create_store("memory", {}))
    assert unwatermarked.pool_queries(caller, image) is None
