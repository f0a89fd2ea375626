"""Scenario ``detectors``: per-query cost of each detector, defense and watermark of the demo
config as one client's history grows (1k, 10k, 100k queries), and the whole protect stage's
per-request cost with 10 vs 100,000 distinct clients in the store, all of like history (and, for
information, with 100,000 stored of which 10 ask, and with 100,000 clients of one query each: see
:func:`clients_results`), with its parts apart (detectors,
defenses, the transaction's end: :data:`PARTS`). Detectors are timed inside a
store transaction, as the gateway runs them (on SQLite: with the write-back cache; the commit,
once per batch of requests in the gateway, is not in a component's figure).

Components are built exactly as the gateway builds them (:class:`gateway.protection.ModelProtection`
from ``deploy/configs/demo.yaml``, standard tier, the demo secret). Queries: Fashion-MNIST images
(with a little jitter) and one-hot-ish probabilities for the classifier; Gaussian 128-d vectors for
the encoder's embeddings and the classifier's penultimate features (hashing cost does not depend
on the values). A client's history is grown 1,000 queries at a time through its detectors; then
``calls`` batches of 1 and of 32 queries are timed per component (the timed calls add at most a
fifth of the history, so each figure is the cost at that history; where that allows fewer than
``MIN_SAMPLES`` calls, several fresh clients are grown alike and their calls pooled). Figures are
per query: the median over calls of (call time / batch). Defenses and the watermark are timed for
an unflagged and a flagged client alike (``misinformation[ok]``, ``misinformation[flagged]``):
their cost depends on the standing, not on the history.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.detectors import classifier_batches
from bench.results import Result, Sample, find, median_result
from contracts.batch import QueryBatch
from contracts.state import StateStore
from defenses.base import DefenseContext
from gateway.auth import Client
from gateway.protection import ModelProtection

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "configs" / "demo.yaml"
MODELS = {"fashion-classifier": "classifier", "fashion-encoder": "encoder"}
MIN_SAMPLES = 30  # timed calls per component and history, pooled over fresh clients where one allows fewer
MAX_COPIES = 10  # ...at most this many clients per history


def demo_protection(model: str, store: StateStore) -> ModelProtection:
    """The demo config's protect stage for ``model`` over ``store``."""
    from prometheus_client import CollectorRegistry

    from gateway.alerts import AlertSink
    from gateway.config import load_config
    from gateway.metrics import GatewayMetrics
    from gateway.secrets import load_server_secret

    config = load_config(DEMO_CONFIG)
    index, model_config = next((i, m) for i, m in enumerate(config.models) if m.name == model)
    metrics = GatewayMetrics(CollectorRegistry(), [m.name for m in config.models])
    secret = load_server_secret(config.auth)
    return ModelProtection(model_config, f"models[{index}]", config.tiers, store, secret, metrics,
                           AlertSink(store))


def demo_batches(model: str, seed: int = 0) -> Callable[[int], QueryBatch]:
    """Query batches for ``model``: ``draw(n)`` -> QueryBatch of n queries (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if MODELS[model] == "encoder":
        image = np.zeros((1, 1, 28, 28), np.float32)

        def draw(n: int) -> QueryBatch:
            outputs = rng.standard_normal((n, 128)).astype(np.float32)
            return QueryBatch(model, "encoder", np.broadcast_to(image, (n, 1, 28, 28)), outputs)

        return draw
    images = classifier_batches(seed)

    def draw_classifier(n: int) -> QueryBatch:
        base = images(n)
        probabilities = (base.outputs * 0.9 + 0.01).astype(np.float32)
        features = np.maximum(rng.standard_normal((n, 128)), 0).astype(np.float32)
        return QueryBatch(model, "classifier", base.inputs, probabilities, embeddings=features)

    return draw_classifier


def honest_batches(model: str, seed: int = 0, pool: int = 20, jitter: float = 0.01) -> Callable[[int], QueryBatch]:
    """Queries of a narrow, honest client (B4B's premise): each is one of ``pool`` fixed queries of
    :func:`demo_batches` with its answer (and embedding) jittered by ``jitter``·N(0, 1), so an
    encoder's client covers a few buckets and stays unflagged however many queries it sends."""
    rng = np.random.default_rng(seed + 1)
    base = demo_batches(model, seed)(pool)

    def jittered(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
        picked = values[idx]
        return (picked + jitter * rng.standard_normal(picked.shape)).astype(np.float32)

    def draw(n: int) -> QueryBatch:
        idx = rng.integers(0, pool, n)
        outputs = jittered(base.outputs, idx)
        embeddings = None if base.embeddings is None else jittered(base.embeddings, idx)
        return QueryBatch(model, base.kind, base.inputs[idx], outputs, embeddings=embeddings)

    return draw


def grow(protection: ModelProtection, client: str, draw: Callable[[int], QueryBatch], queries: int) -> None:
    """Add ``queries`` queries to ``client``'s detector state, 1,000 at a time."""
    detectors = protection.tiers["standard"].detectors.values()
    while queries > 0:
        batch = draw(min(1_000, queries))
        for detector in detectors:
            detector.observe(client, batch)
        queries -= len(batch.outputs)


def time_components(protection: ModelProtection, client: str, batches: Sequence[QueryBatch]) -> dict[str, list[float]]:
    """Seconds per call of each detector, defense and the watermark, over ``batches`` in turn."""
    tier = protection.tiers["standard"]
    times: dict[str, list[float]] = {}

    def timed(name: str, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = call()
        times.setdefault(name, []).append(time.perf_counter() - started)
        return value

    # As the gateway runs detection: inside a store transaction (sqlite: its write-back cache).
    transaction = protection._store.transaction
    for batch in batches:
        with transaction():
            verdicts = {name: timed(name, lambda d=d: d.observe(client, batch)) for name, d in tier.detectors.items()}
        suspicion = max((v.score for v in verdicts.values()), default=0.0)
        # A defense keeps no history: its cost depends on the client's standing (misinformation
        # answers a flagged client with keyed wrong labels, an unflagged one mostly not), which
        # the synthetic stream reaches at some histories and not others. Timed under both, so
        # that each figure compares like with like across histories.
        for standing in ("ok", "flagged"):
            context = DefenseContext(client=client, batch=batch, verdicts=verdicts, suspicion=suspicion,
                                     flagged=standing == "flagged")
            for defense in tier.defenses:
                timed(f"{defense.name}[{standing}]", lambda d=defense, c=context: d.apply(batch.outputs, c))
            if tier.watermark is not None:
                timed(f"watermark:{tier.watermark.name}[{standing}]",
                      lambda c=context: tier.watermark.mark(batch.outputs, c))
    return times


def history_results(store: StateStore, store_name: str, models: Sequence[str], histories: Sequence[int],
                    batch_sizes: Sequence[int], repeats: int) -> list[Result]:
    """Per-query cost of each component of each model at each history (see the module docstring).
    A history too short for :data:`MIN_SAMPLES` timed calls on one client (1,000 queries allow 3
    calls of 32) is measured on several fresh clients grown to it, their calls pooled: a median of
    3 calls made the base of the @100k/@1k ratio a coin toss (a defense that keeps no history
    measured 1.6-2x in one run and 1.0x in the next)."""
    results = []
    for model in models:
        protection = demo_protection(model, store)
        draw = demo_batches(model)
        grow(protection, "warm-up", draw, 1)
        for history in histories:
            calls = {size: max(3, min(repeats, history // 5 // size // len(batch_sizes))) for size in batch_sizes}
            copies = min(MAX_COPIES, max(-(-MIN_SAMPLES // n) for n in calls.values()))
            pooled: dict[int, dict[str, list[float]]] = {size: {} for size in batch_sizes}
            for copy in range(copies):
                client = f"history-{store_name}-{history}-{copy}"
                grow(protection, client, draw, history)
                for size in batch_sizes:
                    times = time_components(protection, client, [draw(size) for _ in range(calls[size])])
                    for name, seconds in times.items():
                        pooled[size].setdefault(name, []).extend(seconds)
            for size in batch_sizes:
                results += _per_query_results(pooled[size], model, store_name, history, size)
    return results


def _per_query_results(times: dict[str, list[float]], model: str, store_name: str, history: int,
                       size: int) -> list[Result]:
    """One result per component from its calls' seconds (each call of ``size`` queries)."""
    results = []
    for name, seconds in times.items():
        per_query = np.asarray(seconds) / size
        results.append(Result(
            scenario="detectors", model=model, contender=name, history=history, clients=1,
            p50_ms=float(np.median(per_query) * 1e3), p99_ms=float(np.percentile(per_query, 99) * 1e3),
            throughput_rps=float(1.0 / per_query.mean()), rounds=len(per_query),
            store=store_name, batch=size))
    return results


def history_ratios(results: Sequence[Result], histories: Sequence[int]) -> list[dict[str, Any]]:
    """Target: per-query cost at the largest history <= 1.5x its cost at the smallest."""
    low, high = min(histories), max(histories)
    ratios = []
    for r in results:
        if r.scenario != "detectors" or r.history != high or r.clients != 1:
            continue
        base = next((b for b in results if b.scenario == "detectors" and b.history == low and b.clients == 1
                     and (b.model, b.contender, b.store, b.batch) == (r.model, r.contender, r.store, r.batch)), None)
        if base is None or base.p50_ms is None:
            continue
        value = r.p50_ms / base.p50_ms  # type: ignore[operator]
        ratios.append({"target": f"per-query cost @{high} / @{low} history",
                       "subject": f"{r.model} {r.contender} {r.store} b{r.batch}",
                       "value": value, "bound": "<= 1.5", "holds": value <= 1.5})
    return ratios


def populate(protection: ModelProtection, draw: Callable[[int], QueryBatch], clients: int,
             queries: int = 1, start: int = 0) -> None:
    """Give clients ``start`` .. ``clients - 1`` state through the protect stage (``queries`` each)."""
    from tqdm import tqdm

    for i in tqdm(range(start, clients), desc=f"clients {start}->{clients}", unit="client", mininterval=2.0,
                  leave=False, disable=clients - start < 10_000):
        timed_protect(protection, Client(f"c{i}"), draw(queries))


PARTS = ("detect", "defend", "commit")  # a protect call's parts, timed apart (see timed_protect)


def timed_protect(protection: ModelProtection, client: Client, batch: QueryBatch) -> np.ndarray:
    """The protect stage as the gateway runs it (``ModelProtection.protect``'s steps, in one store
    transaction where the store has them), timed in its parts: seconds float64 [3] of the detectors
    and policy (``observe``), the defenses and watermark with the evidence they keep (``defend``,
    ``keep_evidence``), and the store transaction's end (the write-back flush and COMMIT)."""
    transaction = protection._store.transaction()
    started = time.perf_counter()
    with transaction:
        snapshot = protection.observe(client, batch)
        detected = time.perf_counter()
        _, marked = protection.defend(client, batch, snapshot)
        if marked is not None:
            protection.keep_evidence(client, marked)
        defended = time.perf_counter()
    return np.array([detected - started, defended - detected, time.perf_counter() - defended])


def time_protect(protection: ModelProtection, draw: Callable[[int], QueryBatch], clients: int, calls: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Seconds of each part (:data:`PARTS`) of each protect call (1 query) of randomly chosen
    existing clients: float64 [calls, 3]; a call's cost is its row's sum."""
    batches = [draw(1) for _ in range(calls)]
    ids = rng.integers(0, clients, calls)
    return np.stack([timed_protect(protection, Client(f"c{i}"), batch)
                     for i, batch in zip(ids, batches, strict=True)])


ACTIVE = "protect[active]"  # the large store's cost when only as many of its clients as the small one has ask
YOUNG = "protect[young]"  # the cost with as many clients as the large store's, each of one query
#: Untimed calls of each cell before its rounds: a store's first few hundred calls after the
#: populating cost up to 1.9x the later ones (the 10-client store's first 500 calls beside
#: 100,000-client stores: 0.31 ms, then 0.17; not the file system's writeback, which os.sync()
#: showed done), so without them the small store's figure followed what ran before it.
WARM_UP_CALLS = 500


def clients_results(stores: dict[str, tuple[StateStore, StateStore, StateStore]], model: str,
                    counts: tuple[int, int], calls: int, rounds: int, seed: int = 0) -> list[Result]:
    """The protect stage's per-request cost (batch 1) with ``counts[0]`` vs ``counts[1]`` clients in
    the store, of like history: two stores per kind, populated through the protect stage, timed in
    alternating rounds. The clients are honest (:func:`honest_batches`): with :func:`demo_batches`'
    thief-like answers the few clients, sent thousands of queries each, became flagged halfway and
    paid for the defenses' flagged path while the many stayed unflagged, so the two counts did not
    do the same work.

    Each timed call of the large store picks one of its ``counts[1]`` clients at random: a client
    nobody asked about lately, cold in every cache, where the small store's are hot. A client's
    cost also follows its history (an honest client's coverage bitmap gains buckets in most of its
    first ~50 calls, each written back, and seldom after ~100), and the few clients, populated with
    one query each, are asked ``(WARM_UP_CALLS + rounds * calls) / counts[0]`` more: so the many are
    populated with the few's median over the timing (:func:`like_history`), and the two counts
    differ in number and not in age. Each cell first runs :data:`WARM_UP_CALLS` untimed calls.
    For information, the same rounds also time (``clients`` = ``counts[1]``):

    - :data:`ACTIVE`: the large store with calls from its first ``counts[0]`` clients only, as many
      stored, as few asking as in the small store (the store's size told apart from the askers');
    - :data:`YOUNG`: a third store of ``counts[1]`` clients of one query each (the new clients'
      cost, which the target leaves out).

    Each result's ``history`` is its askers' median history over the timed calls."""
    results = []
    rng = np.random.default_rng(seed)
    grown, settled = like_history(counts, calls, rounds), _settled(calls, rounds)
    for store_name, (small, large, young) in stores.items():
        draw = honest_batches(model, seed)
        protections = (demo_protection(model, small), demo_protection(model, large), demo_protection(model, young))
        for protection, count, history in zip(protections, (*counts, counts[1]), (1, grown, 1), strict=True):
            populate(protection, draw, count, queries=history)
        # (contender, clients stored, protection, clients asking, their history before the timing)
        cells = [("protect", counts[0], protections[0], counts[0], 1),
                 ("protect", counts[1], protections[1], counts[1], grown),
                 (ACTIVE, counts[1], protections[1], counts[0], grown),
                 (YOUNG, counts[1], protections[2], counts[1], 1)]
        samples: dict[tuple[str, int], list[np.ndarray]] = {(c, n): [] for c, n, *_ in cells}
        for _, _, protection, asking, _ in cells:
            time_protect(protection, draw, asking, WARM_UP_CALLS, rng)
        for _ in range(rounds):
            for contender, stored, protection, asking, _ in cells:
                samples[contender, stored].append(time_protect(protection, draw, asking, calls, rng))
        for contender, stored, _, asking, before in cells:
            results.append(_protect_result(model, store_name, contender, stored, samples[contender, stored],
                                           asking=asking if contender == ACTIVE else None,
                                           history=before + settled // asking))
    return results


def like_history(counts: tuple[int, int], calls: int, rounds: int) -> int:
    """Queries each of the ``counts[1]`` clients is populated with: the median history over the
    timing of the ``counts[0]`` clients, populated with one query, then asked
    :data:`WARM_UP_CALLS` times and ``calls`` times a round."""
    return 1 + _settled(calls, rounds) // counts[0]


def _settled(calls: int, rounds: int) -> int:
    """Calls a cell has made (warm-up and rounds) before its median timed call."""
    return WARM_UP_CALLS + rounds * calls // 2


def _protect_result(model: str, store_name: str, contender: str, stored: int, rounds_parts: list[np.ndarray],
                    asking: int | None, history: int) -> Result:
    """Medians over rounds of the calls' p50, p99 and rate (:func:`median_result`, a round's wall
    time being its calls' sum), and in ``extra.parts_p50_ms`` each part's median (where a client
    nobody asked lately pays more: see the README)."""
    result = median_result([Sample(parts.sum(axis=1), float(parts.sum())) for parts in rounds_parts],
                           scenario="detectors", model=model, contender=contender, store=store_name, batch=1,
                           history=history, clients=stored)
    result.extra["parts_p50_ms"] = {name: float(np.median([np.median(p[:, k]) for p in rounds_parts]) * 1e3)
                                    for k, name in enumerate(PARTS)}
    if asking is not None:
        result.extra["asking_clients"] = asking
    return result


def clients_ratios(results: Sequence[Result], counts: tuple[int, int]) -> list[dict[str, Any]]:
    """Target: per-request cost with ``counts[1]`` clients <= 1.2x with ``counts[0]``; beside it, for
    information, the large store's cost when only ``counts[0]`` of its clients ask (:data:`ACTIVE`)
    and that of ``counts[1]`` clients of one query each (:data:`YOUNG`)."""
    ratios = []
    for r in results:
        if r.scenario == "detectors" and r.contender in ("protect", ACTIVE, YOUNG) and r.clients == counts[1]:
            base = find(results, scenario="detectors", model=r.model, contender="protect", store=r.store,
                        clients=counts[0])
            if base is None:
                continue
            value = r.p50_ms / base.p50_ms  # type: ignore[operator]
            if r.contender == ACTIVE:
                ratios.append({"target": f"protect cost with {counts[1]} stored, {counts[0]} asking / {counts[0]}",
                               "subject": f"{r.model} protect {r.store}", "value": value,
                               "bound": "info", "holds": True})
            elif r.contender == YOUNG:
                ratios.append({"target": f"protect cost with {counts[1]} clients of 1 query / {counts[0]}",
                               "subject": f"{r.model} protect {r.store}", "value": value,
                               "bound": "info", "holds": True})
            else:
                ratios.append({"target": f"protect cost with {counts[1]} / {counts[0]} clients",
                               "subject": f"{r.model} protect {r.store}", "value": value,
                               "bound": "<= 1.2", "holds": value <= 1.2})
                ratios += _part_ratios(r, base, counts)
    return ratios


def _part_ratios(many: Result, few: Result, counts: tuple[int, int]) -> list[dict[str, Any]]:
    """For information: each part's p50 with ``counts[1]`` clients over ``counts[0]``, its ms in the subject."""
    ratios = []
    for name in PARTS:
        high, low = many.extra["parts_p50_ms"][name], few.extra["parts_p50_ms"][name]
        ratios.append({"target": f"protect part with {counts[1]} / {counts[0]} clients",
                       "subject": f"{many.model} {name} {many.store} ({low:.3f} -> {high:.3f} ms)",
                       "value": high / low if low > 0 else float("inf"), "bound": "info", "holds": True})
    return ratios
