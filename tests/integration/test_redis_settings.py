"""Issue 26: moat refuses a Redis that evicts keys, and says when one persists nothing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.state import create_store
from tests.servers.procs import free_port, start_redis


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random"])
def test_a_redis_that_evicts_keys_is_refused(policy: str, tmp_path: Path) -> None:
    server = start_redis(tmp_path, "--maxmemory-policy", policy)
    try:
        with pytest.raises(ConfigError) as caught:
            create_store("redis", {"url": server.info["url"]}, "state")
    finally:
        server.stop()
    assert caught.value.field == "state.params.url"
    assert f"maxmemory-policy {policy}" in caught.value.problem and "noeviction" in caught.value.problem


def test_a_redis_without_persistence_is_accepted_with_a_warning(tmp_path: Path, caplog) -> None:
    server = start_redis(tmp_path)  # the test server: noeviction, no RDB, no AOF
    try:
        with caplog.at_level(logging.WARNING, logger="moat.state"):
            store = create_store("redis", {"url": server.info["url"]}, "state")
        store.incr("m/alice/n", {"n": 1})
    finally:
        server.stop()
    events = [json.loads(r.getMessage())["event"] for r in caplog.records if r.name == "moat.state"]
    assert events == ["redis_without_persistence"]


def test_a_redis_not_reachable_yet_is_not_checked(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="moat.state"):
        create_store("redis", {"url": f"redis://127.0.0.1:{free_port()}/0", "socket_timeout": 0.5}, "state")
    assert not [r for r in caplog.records if r.name == "moat.state"]
