"""SqliteStore.transaction: a request's store calls commit once, together, or not at all."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from gateway.state.base import create_store


def _other_thread(call):
    """Run ``call`` on another thread (its own connection) and return its result."""
    out = []
    thread = threading.Thread(target=lambda: out.append(call()))
    thread.start()
    thread.join()
    return out[0]


def test_calls_commit_together_at_the_end(tmp_path: Path) -> None:
    store = create_store("sqlite", {"path": str(tmp_path / "s.db")})
    with store.transaction():
        store.incr("m/c/status", {"queries": 1})
        store.set_bits("m/c/cov", np.array([3, 9]), 16, 8)
        store.append_record("/evidence/m/c", {"q": 1})
        assert store.get_fields("m/c/status") == {"queries": 1.0}  # this thread sees its own writes
        assert _other_thread(lambda: store.get_fields("m/c/status")) == {}  # others do not, yet
        with store.transaction():  # nested: a savepoint, committed with the outer transaction
            store.incr("m/c/status", {"queries": 1})
    assert _other_thread(lambda: store.get_fields("m/c/status")) == {"queries": 2.0}
    assert list(store.count_bits("m/c/cov", 16, 8)) == [1, 1]
    assert [r for _, r in store.read_records("/evidence/m/c")] == [{"q": 1}]
    store.close()


def test_an_exception_rolls_every_call_back(tmp_path: Path) -> None:
    store = create_store("sqlite", {"path": str(tmp_path / "s.db")})
    store.incr("m/c/status", {"queries": 5})
    with pytest.raises(RuntimeError), store.transaction():
        store.incr("m/c/status", {"queries": 1})
        store.set_bits("m/c/cov", np.array([1]), 16, 8)
        raise RuntimeError("the defense failed")
    assert store.get_fields("m/c/status") == {"queries": 5.0}
    assert list(store.count_bits("m/c/cov", 16, 8)) == [0, 0]
    store.incr("m/c/status", {"queries": 1})  # the store is usable afterwards
    assert store.get_fields("m/c/status") == {"queries": 6.0}
    store.close()


def test_a_nested_block_that_fails_undoes_only_its_own_writes(tmp_path: Path) -> None:
    store = create_store("sqlite", {"path": str(tmp_path / "s.db")})
    with store.transaction():
        store.incr("m/a/status", {"queries": 1})
        with pytest.raises(RuntimeError), store.transaction():
            store.incr("m/b/status", {"queries": 1})
            store.set_bits("m/b/cov", np.array([2]), 16, 8)
            raise RuntimeError("one request's detection failed")
        with store.transaction():
            store.incr("m/c/status", {"queries": 3})
    assert _other_thread(lambda: store.get_fields("m/a/status")) == {"queries": 1.0}
    assert _other_thread(lambda: store.get_fields("m/b/status")) == {}
    assert list(store.count_bits("m/b/cov", 16, 8)) == [0, 0]
    assert _other_thread(lambda: store.get_fields("m/c/status")) == {"queries": 3.0}
    store.close()
