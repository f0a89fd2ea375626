"""Scenario ``state``: operations per second and bytes per client of the ``sqlite`` and ``redis``
stores (a real redis-server started for the bench).

Operations are the ones a request's protect stage makes, timed one by one (single thread):
``set_bits`` (the coverage bitmap of the demo config: 20 tables of 2^12 buckets, one query's 20
bits), ``get_fields``, ``incr`` and ``set_fields`` (the client's status hash), ``push_rows`` and
``get_rows`` (a PRADA set of 64-d rows, bounded at 1,000). Bytes per client are *measured*: clients
get coverage state through the demo encoder's protect stage (bitmap, status hash, figures), from
spread (thief-like) and from narrow (honest) queries, and the store's size is read before and
after: the SQLite file's pages in use (``page_count - freelist_count``, after a WAL checkpoint) and
Redis' ``used_memory``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.results import Result
from contracts.state import StateStore
from gateway.state.base import create_store

TOTAL_BITS, SEGMENT_BITS = 20 * 4096, 4096


def _ops(store: StateStore, rng: np.random.Generator) -> dict[str, Callable[[int], Any]]:
    rows = rng.standard_normal((1, 64)).astype(np.float32)

    def bits(i: int) -> Any:
        positions = np.arange(20) * SEGMENT_BITS + rng.integers(0, SEGMENT_BITS, 20)
        return store.set_bits(f"ops/c{i % 100}/cov", positions, TOTAL_BITS, SEGMENT_BITS)

    return {
        "set_bits": bits,
        "get_fields": lambda i: store.get_fields(f"ops/c{i % 100}/status"),
        "incr": lambda i: store.incr(f"ops/c{i % 100}/status", {"queries": 1}),
        "set_fields": lambda i: store.set_fields(f"ops/c{i % 100}/status",
                                                 {"status": "ok", "suspicion": 0.1, "coverage.coverage": 3.0}),
        "update_fields": lambda i: store.update_fields(f"ops/c{i % 100}/status",
                                                       {"status": "ok", "suspicion": 0.1}, {"queries": 1}),
        "push_rows": lambda i: store.push_rows(f"ops/c{i % 100}/rows", rows, 1000),
        "get_rows": lambda i: store.get_rows(f"ops/c{i % 100}/rows", 64),
    }


def ops_results(store: StateStore, name: str, calls: int, rounds: int, seed: int = 0) -> list[Result]:
    """Ops/s and latency of each operation, rounds interleaved across operations."""
    ops = _ops(store, np.random.default_rng(seed))
    for op in ops.values():
        for i in range(200):  # warm-up; also fills the row sets to their working size
            op(i)
    seconds: dict[str, list[np.ndarray]] = {op: [] for op in ops}
    for _ in range(rounds):
        for op_name, op in ops.items():
            times = np.empty(calls)
            for i in range(calls):
                started = time.perf_counter()
                op(i)
                times[i] = time.perf_counter() - started
            seconds[op_name].append(times)
    return [Result(scenario="state", model="-", contender=op, store=name, rounds=rounds,
                   p50_ms=float(np.median([np.median(t) for t in s]) * 1e3),
                   p99_ms=float(np.median([np.percentile(t, 99) for t in s]) * 1e3),
                   throughput_rps=float(np.median([len(t) / t.sum() for t in s])))
            for op, s in seconds.items()]


def sqlite_bytes(store: StateStore) -> int:
    """Bytes of the SQLite file's pages in use, after folding the WAL into the file."""
    conn = store._conn()  # type: ignore[attr-defined]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages, free, size = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                         for p in ("page_count", "freelist_count", "page_size"))
    return int((pages - free) * size)


def redis_bytes(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def bytes_results(store: StateStore, name: str, measure: Callable[[], int], clients: int,
                  queries: int, seed: int = 0) -> list[Result]:
    """Bytes per client of the demo encoder's coverage state, from the store's size before/after
    ``clients`` new clients sent ``queries`` each: spread queries (``coverage-state``: Gaussian
    embeddings, a thief's kind, ~2,000 of 81,920 buckets each) and narrow ones
    (``coverage-state[narrow]``: an honest client's, a few hundred buckets; SQLite keeps those
    as positions, see :mod:`gateway.state.bitsets`)."""
    from bench.components import (
        demo_batches,
        demo_protection,
        honest_batches,
        populate,
    )

    protection = demo_protection("fashion-encoder", store)
    results = []
    kinds = (("coverage-state", demo_batches("fashion-encoder", seed)),
             ("coverage-state[narrow]", honest_batches("fashion-encoder", seed)))
    for index, (contender, draw) in enumerate(kinds):  # each kind its own, new clients
        before = measure()
        populate(protection, draw, (index + 1) * clients, queries=queries, start=index * clients)
        after = measure()
        results.append(Result(scenario="state", model="fashion-encoder", contender=contender, store=name,
                              clients=clients, bytes_per_client=(after - before) / clients,
                              extra={"queries_per_client": queries}))
    return results


def run_state(workdir: Path, *, stores: Sequence[str] = ("sqlite", "redis"), calls: int = 2000, rounds: int = 3,
              clients: int = 2000, queries: int = 100) -> list[Result]:
    from bench.procs import Processes

    results = []
    with Processes(workdir) as procs:
        for name in stores:
            if name == "sqlite":
                store = create_store("sqlite", {"path": str(workdir / "state-bench.db")})
                measure: Callable[[], int] = lambda store=store: sqlite_bytes(store)  # noqa: E731
            else:
                url = procs.redis()
                store = create_store("redis", {"url": url})
                measure = lambda url=url: redis_bytes(url)  # noqa: E731
            try:
                results += ops_results(store, name, calls, rounds)
                results += bytes_results(store, name, measure, clients, queries)
            finally:
                store.close()
    return results


def state_ratios(results: Sequence[Result]) -> list[dict[str, Any]]:
    """Target: coverage state <= 16 KB per client in each store."""
    return [{"target": "coverage state bytes per client", "subject": f"{r.model} {r.contender} {r.store}",
             "value": r.bytes_per_client, "bound": "<= 16384", "holds": r.bytes_per_client <= 16384}
            for r in results if r.scenario == "state" and r.bytes_per_client is not None]
