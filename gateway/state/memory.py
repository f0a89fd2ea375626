"""The ``memory`` state store: a process-local reference implementation (tests, offline use)."""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any, ContextManager

import numpy as np

from contracts.params import ConfigError
from gateway.state.base import (
    STATE_STORES,
    field_values,
    newest_rows,
    packed_with_bits,
    segment_counts,
)


class MemoryStore:
    """Everything in dicts behind one lock; nothing survives the process."""

    local = True  # calls never wait on a network: the event loop may make them
    transactional = False  # each call is atomic under the lock; there is nothing to commit

    def transaction(self) -> ContextManager[None]:
        return nullcontext()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bitmaps: dict[str, np.ndarray] = {}
        self._hashes: dict[str, dict[str, float | str]] = {}
        self._rows: dict[str, np.ndarray] = {}
        self._streams: dict[str, deque[tuple[int, str]]] = {}
        self._next_id: dict[str, int] = {}

    def set_bits(self, key: str, positions: np.ndarray, total_bits: int, segment_bits: int) -> np.ndarray:
        with self._lock:
            self._bitmaps[key] = packed_with_bits(self._bitmaps.get(key), positions, total_bits)
            return segment_counts(self._bitmaps[key], segment_bits)

    def count_bits(self, key: str, total_bits: int, segment_bits: int) -> np.ndarray:
        with self._lock:
            bits = self._bitmaps.get(key)
        if bits is None:
            return np.zeros(total_bits // segment_bits, np.int64)
        return segment_counts(bits, segment_bits)

    def bitmap_bytes(self, key: str) -> int:
        with self._lock:
            bits = self._bitmaps.get(key)
        return 0 if bits is None else int(bits.nbytes)

    def incr(self, key: str, fields: Mapping[str, float]) -> dict[str, float]:
        with self._lock:
            stored = self._hashes.setdefault(key, {})
            for name, amount in fields.items():
                stored[name] = float(stored.get(name, 0.0)) + float(amount)
            return {name: float(stored[name]) for name in fields}

    def set_fields(self, key: str, fields: Mapping[str, float | str]) -> None:
        values = field_values(key, fields)
        with self._lock:
            self._hashes.setdefault(key, {}).update(values)

    def update_fields(self, key: str, put: Mapping[str, float | str], add: Mapping[str, float]) -> dict[str, float]:
        values = field_values(key, put, add)
        with self._lock:
            stored = self._hashes.get(key, {})
            text = [name for name in add if isinstance(stored.get(name), str)]
            if text:
                raise ValueError(f"field {text[0]!r} of {key!r} holds text, not a number")
            added = {name: float(stored.get(name, 0.0)) + float(amount) for name, amount in add.items()}
            self._hashes[key] = {**stored, **values, **added}
            return added

    def get_fields(self, key: str) -> dict[str, float | str]:
        with self._lock:
            return dict(self._hashes.get(key, {}))

    def push_rows(self, key: str, rows: np.ndarray, max_rows: int) -> int:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        rows = np.asarray(rows, dtype=np.float32)
        with self._lock:
            current = self._rows.get(key)
            if current is not None and current.shape[1] != rows.shape[1]:
                raise ValueError(f"rows for {key!r} have width {current.shape[1]}, got {rows.shape[1]}")
            self._rows[key] = newest_rows(current, rows, max_rows)
            return len(self._rows[key])

    def get_rows(self, key: str, dim: int) -> np.ndarray:
        with self._lock:
            rows = self._rows.get(key)
        return np.zeros((0, dim), np.float32) if rows is None else rows  # read-only, replaced on push

    def append_record(self, stream: str, record: Mapping[str, Any], max_records: int | None = None) -> int:
        if max_records is not None and max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        text = json.dumps(record)
        with self._lock:
            record_id = self._next_id.get(stream, 0) + 1
            self._next_id[stream] = record_id
            entries = self._streams.setdefault(stream, deque())
            entries.append((record_id, text))
            while max_records is not None and len(entries) > max_records:
                entries.popleft()
            return record_id

    def read_records(self, stream: str, after_id: int = 0, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        with self._lock:
            entries = list(self._streams.get(stream, ()))
        return [(i, json.loads(t)) for i, t in entries if i > after_id][:limit]

    def delete(self, prefix: str) -> int:
        with self._lock:
            removed = 0
            for table in (self._bitmaps, self._hashes, self._rows, self._streams):
                for key in [k for k in table if k.startswith(prefix)]:
                    del table[key]
                    removed += 1
            return removed

    def close(self) -> None:
        return None


@STATE_STORES.register("memory")
def create_memory(params: Mapping[str, Any], where: str) -> MemoryStore:
    if params:
        raise ConfigError(f"{where}.{sorted(params)[0]}", "the memory store takes no parameters")
    return MemoryStore()
