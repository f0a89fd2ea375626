"""Per-query cost of each detector as one client's history grows: the bounded bitmaps and windows
must keep it flat (target: cost at 100k queries of history <= 1.5 x cost at 1k).

``python -m bench.detectors [--store memory|sqlite [--path FILE]] [--repeats N] [--threads N]``

Coverage runs on an encoder answering 128-d embeddings (synthetic Gaussian vectors: its cost does not
depend on their values); PRADA on a 10-class classifier fed Fashion-MNIST images (labels as one-hot
outputs, a little jitter so repeated images stay distinct) or uniform noise when the dataset is not
installed. History is built in batches of 1,000, then observe calls of 1 and of 32 queries are timed
(see :func:`cell`). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from contracts.batch import ModelKind, QueryBatch
from contracts.state import StateStore
from detectors.base import Detector, create_detector
from gateway.state.base import create_store

HISTORIES = (1_000, 10_000, 100_000)
BATCHES = (1, 32)
ROUNDS = 3
MODEL = "bench"
THREADS_NOTE = ("note: a request's detector work is a few small matrix products and a small flat-index search;\n"
                "FAISS's OpenMP threads add wake-up latency to each, and when the cores are busy a call can\n"
                "stall for milliseconds (2 threads on 2 cores shared with other test runs: mean cost of\n"
                "one-query calls 30-100x the single-thread cost). Serve with one FAISS thread per request:\n"
                "faiss.omp_set_num_threads(1) or OMP_NUM_THREADS=1; requests run in parallel anyway.")


@dataclass(frozen=True)
class Workload:
    """A detector and a source of query batches for it: ``draw(n)`` -> QueryBatch of n queries."""

    name: str
    params: dict[str, object]
    kind: ModelKind
    draw: Callable[[int], QueryBatch]


def encoder_batches(seed: int = 0, dim: int = 128) -> Callable[[int], QueryBatch]:
    """Batches of an encoder's answers: inputs float32 [n,1,28,28] (unused), outputs float32 [n, dim]."""
    rng = np.random.default_rng(seed)
    image = np.zeros((1, 1, 28, 28), np.float32)

    def draw(n: int) -> QueryBatch:
        outputs = rng.standard_normal((n, dim)).astype(np.float32)
        return QueryBatch(MODEL, "encoder", np.broadcast_to(image, (n, 1, 28, 28)), outputs)

    return draw


def classifier_batches(seed: int = 0) -> Callable[[int], QueryBatch]:
    """Batches of classifier queries: Fashion-MNIST (or noise) images float32 [n,1,28,28], one-hot [n,10]."""
    rng = np.random.default_rng(seed)
    try:
        from evaluation.data import load_fashion_mnist

        train = load_fashion_mnist("train")
        images, labels = train.images, train.labels
    except (FileNotFoundError, ValueError):
        images = rng.random((10_000, 1, 28, 28), dtype=np.float32)
        labels = rng.integers(0, 10, len(images))
    eye = np.eye(10, dtype=np.float32)

    def draw(n: int) -> QueryBatch:
        idx = rng.integers(0, len(images), n)
        jitter = rng.uniform(0.0, 0.02, (n, 1, 28, 28)).astype(np.float32)
        x = np.clip(images[idx] + jitter, 0.0, 1.0)
        return QueryBatch(MODEL, "classifier", x, eye[labels[idx]])

    return draw


def workloads() -> list[Workload]:
    return [Workload("coverage", {}, "encoder", encoder_batches()),
            Workload("prada", {}, "classifier", classifier_batches())]


def grow(detector: Detector, client: str, draw: Callable[[int], QueryBatch], queries: int) -> None:
    """Add ``queries`` queries to the client's history, 1,000 at a time."""
    while queries > 0:
        n = min(1_000, queries)
        detector.observe(client, draw(n))
        queries -= n


def time_per_query(detector: Detector, client: str, draw: Callable[[int], QueryBatch], batch: int,
                   calls: int) -> float:
    """Mean microseconds per query over ``calls`` observe calls of ``batch`` queries (drawn beforehand)."""
    batches = [draw(batch) for _ in range(calls)]
    start = time.perf_counter()
    for b in batches:
        detector.observe(client, b)
    return (time.perf_counter() - start) / (calls * batch) * 1e6


def cell(detector: Detector, work: Workload, batch: int, history: int, repeats: int) -> float:
    """Best of ROUNDS measurements (as timeit does, so other processes' bursts do not count), each on a
    fresh client grown to ``history`` queries. The timed calls add at most a fifth of ``history`` (and
    at most ``repeats`` calls), so each cell measures the cost at that history, not beyond it."""
    calls = max(3, min(repeats, history // 5 // batch))
    best = float("inf")
    for r in range(ROUNDS):
        client = f"{work.name}-b{batch}-h{history}-r{r}"
        grow(detector, client, work.draw, history)
        best = min(best, time_per_query(detector, client, work.draw, batch, calls))
    return best


def bench(store: StateStore, repeats: int) -> list[tuple[str, int, list[float]]]:
    """Rows (detector, batch size, µs/query at each history in HISTORIES)."""
    rows = []
    for work in workloads():
        detector = create_detector(work.name, work.params, store=store, kind=work.kind, seed=1234)
        detector.observe("warm-up", work.draw(1))  # build the cached projection / hasher untimed
        for batch in BATCHES:
            rows.append((work.name, batch, [cell(detector, work, batch, h, repeats) for h in HISTORIES]))
    return rows


def print_table(rows: list[tuple[str, int, list[float]]], setting: str) -> None:
    head = "".join(f"{f'@{h // 1000}k':>11}" for h in HISTORIES)
    print(f"per-query cost in µs ({setting}), best of {ROUNDS} rounds of timed observe calls")
    print(f"{'detector':<10}{'batch':>6}{head}{'100k/1k':>10}")
    for name, batch, costs in rows:
        cells = "".join(f"{c:>11.1f}" for c in costs)
        print(f"{name:<10}{batch:>6}{cells}{costs[-1] / costs[0]:>10.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    parser.add_argument("--path", help="SQLite file (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=200, help="most timed observe calls per round")
    parser.add_argument("--threads", type=int, default=1,
                        help="FAISS OpenMP threads (default 1: see the note printed with the table)")
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        params = {} if args.store == "memory" else {"path": args.path or str(Path(tmp) / "bench.sqlite")}
        store = create_store(args.store, params)
        try:
            print_table(bench(store, args.repeats), f"{args.store} store, {args.threads} FAISS thread(s)")
            print(THREADS_NOTE)
        finally:
            store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
