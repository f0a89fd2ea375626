"""Scenario ``overhead``: what moat adds to a request, against the floor of any Python gRPC hop.

Four contenders answer the demo classifier and encoder from one real KServe ModelServer, all over
loopback, driven by the stock tritonclient (batch-1 requests of Fashion-MNIST images, none sent twice
to one contender: honest clients, see :func:`distinct_images`):

- ``direct``: the client talks to KServe itself;
- ``bare-proxy``: through :mod:`bench.proxy` (bytes in, bytes out);
- ``moat-off``: through moat with the upstream backend and no detectors, defenses or watermark;
- ``moat-full``: through moat with the demo config's protection of each model (detectors,
  defenses, watermark, policy, SQLite state), forwarding to the same KServe. The classifier's
  coverage detector hashes pixels here (``source: auto``): an upstream backend has no
  penultimate features to hash.

Both moat contenders forward with upstream batching (``max_batch_rows: 32``, as the sidecar config:
concurrent requests share upstream calls). ``moat bench --compare NAME=TREE`` adds ``moat-full@NAME``:
the same full protection served by the code in another checkout (say ``git worktree add /tmp/before
HEAD~1``), an A/B of a change; ``--unbatched`` adds ``moat-full@unbatched``, this checkout's full
protection with each request sent upstream alone.

Rounds interleave the contenders (the order rotates each round) so that load from other
processes hits them alike; each figure is the median over rounds. The proxy's and each gateway's
CPU time per request (read from /proc around each round) is kept with its results.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.load import Load
from bench.procs import REPO, Processes
from bench.results import (
    Result,
    Sample,
    find,
    median_result,
    paired_ratios,
    quartiles,
)

DEMO_CONFIG = REPO / "deploy" / "configs" / "demo.yaml"
CONTENDERS = ("direct", "bare-proxy", "moat-off", "moat-full")
COMPARED = "moat-full@"  # + NAME: moat-full served from another checkout (``--compare NAME=TREE``)
OUTPUTS = {"fashion-classifier": "probabilities", "fashion-encoder": "embedding"}
WARM_UP = (8, 64)  # concurrency and requests of each load's warm-up round
FASHION_MNIST_IMAGES = 70_000  # its test and training sets: the most distinct images a load can send
UPSTREAM_BATCH_ROWS = 32  # as deploy/configs/sidecar.yaml
UNBATCHED = "unbatched"  # moat-full@unbatched: full protection, each request upstream alone


def bench_keys(workdir: Path, clients: int) -> tuple[Path, list[str]]:
    """A keys file with ``clients`` bench clients (standard tier); returns it and the raw keys."""
    from gateway.auth import hash_key

    keys = [f"bench-client-{i}-key" for i in range(clients)]
    path = workdir / "bench-keys.yaml"
    path.write_text(yaml.safe_dump({
        "admin_token_sha256": hash_key("bench-admin-token"),
        "clients": [{"id": f"bench-{i}", "key_sha256": hash_key(k)} for i, k in enumerate(keys)]}))
    return path, keys


def moat_config(workdir: Path, upstream: str, keys_file: Path, *, protected: bool, name: str = "",
                batch_rows: int = UPSTREAM_BATCH_ROWS) -> Path:
    """The demo config forwarding to ``upstream``; with ``protected=False`` its protection is removed.
    ``name`` (default ``moat-full`` / ``moat-off``) names its file and its SQLite state; concurrent
    requests share upstream calls of up to ``batch_rows`` rows (1: each goes alone)."""
    name = name or f"moat-{'full' if protected else 'off'}"
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["auth"] = {"keys_file": str(keys_file), "server_secret_file": str(DEMO_CONFIG.parent / "demo-secret")}
    data["state"] = ({"name": "sqlite", "params": {"path": str(workdir / f"{name}-state.db")}}
                     if protected else {"name": "memory"})
    for model in data["models"]:
        model["backend"] = {"name": "upstream", "params": {"address": upstream, "model": model["name"]}}
        if batch_rows > 1:
            model["backend"]["params"]["max_batch_rows"] = batch_rows
        if not protected:
            for key in ("detectors", "defenses", "watermark", "policy"):
                model.pop(key, None)
            continue
        for detector in model.get("detectors", []):
            if detector.get("params", {}).get("source") == "embedding":
                detector["params"]["source"] = "auto"
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_contenders(procs: Processes, workdir: Path, clients: int, contenders: Sequence[str] = CONTENDERS,
                     compare: Mapping[str, Path] | None = None, unbatched: bool = False,
                     ) -> tuple[dict[str, str], list[str]]:
    """Start KServe, the proxy and both gateways, a ``moat-full@NAME`` gateway running the code of
    each ``compare`` tree (NAME -> a checkout of moat), and with ``unbatched`` ``moat-full@unbatched``
    (no upstream batching); returns contender -> address, and the API keys."""
    from evaluation import zoo

    upstream = procs.kserve({name: zoo.zoo_path(name) for name in OUTPUTS}, OUTPUTS)
    keys_file, keys = bench_keys(workdir, clients)
    addresses = {"direct": upstream}
    if "bare-proxy" in contenders:
        addresses["bare-proxy"] = procs.proxy(upstream)
    for name, protected in (("moat-off", False), ("moat-full", True)):
        if name in contenders:
            addresses[name] = procs.gateway(name, moat_config(workdir, upstream, keys_file, protected=protected))
    for label, tree in (compare or {}).items():
        name = COMPARED + label
        config = moat_config(workdir, upstream, keys_file, protected=True, name=name)
        addresses[name] = procs.gateway(name, config, tree=tree)
    if unbatched:
        name = COMPARED + UNBATCHED
        addresses[name] = procs.gateway(name, moat_config(workdir, upstream, keys_file, protected=True, name=name,
                                                          batch_rows=1))
    return addresses, keys


def test_images(count: int, seed: int) -> np.ndarray:
    """``count`` Fashion-MNIST images, float32 [count, 1, 28, 28] in [0, 1]: the test set in a seeded
    order, then (beyond its 10,000) the training set's, up to 70,000."""
    from evaluation.data import load_fashion_mnist

    rng = np.random.default_rng(seed)
    test = load_fashion_mnist("test").images
    ordered = test[rng.permutation(len(test))[:count]]
    if count <= len(test):
        return ordered
    if count > FASHION_MNIST_IMAGES:
        raise ValueError(f"count must be <= {FASHION_MNIST_IMAGES} (Fashion-MNIST's images), got {count}")
    train = load_fashion_mnist("train").images
    return np.concatenate([ordered, train[rng.permutation(len(train))[:count - len(test)]]])


def distinct_images(requests: Mapping[int, int], rounds: int, seed: int) -> np.ndarray:
    """As many images as one load sends in a run (warm-up included), so that no client sends one
    twice: a small pool cycled through made every bench client repeat exact images, which PRADA
    reads as a thief's synthetic stream (all 32 were flagged, and full protection was measured on
    flagged clients' answers); honest users mostly send an image once."""
    per_load = WARM_UP[1] + rounds * sum(requests.values())
    return test_images(min(per_load, FASHION_MNIST_IMAGES), seed)


async def _measure(procs: Processes, addresses: dict[str, str], keys: list[str], images: np.ndarray,
                   models: Sequence[str], concurrencies: Sequence[int], requests: dict[int, int],
                   rounds: int) -> list[Result]:
    loads = {(c, m): Load(addresses[c], m, images, keys) for c in addresses for m in models}
    for load in loads.values():
        await load.__aenter__()
    try:
        for load in loads.values():  # warm-up: channels, model caches, the first state rows
            await load.run(*WARM_UP)
        samples: dict[tuple[str, str, int], list[Sample]] = {}
        contenders = list(addresses)
        for r in range(rounds):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            for model in models:
                for concurrency in concurrencies:
                    for contender in order:
                        before = procs.cpu_seconds(contender)
                        sample = await loads[contender, model].run(concurrency, requests[concurrency])
                        after = procs.cpu_seconds(contender)
                        if before is not None and after is not None:
                            sample = dataclasses.replace(sample, cpu_s=after - before)
                        samples.setdefault((contender, model, concurrency), []).append(sample)
    finally:
        for load in loads.values():
            await load.__aexit__()
    return [median_result(s, scenario="overhead", model=m, contender=c, concurrency=k,
                          clients=len(keys) if c.startswith("moat") else None)
            for (c, m, k), s in samples.items()]


def run_overhead(workdir: Path, *, models: Sequence[str] = tuple(OUTPUTS), concurrencies: Sequence[int] = (1, 32),
                 requests: dict[int, int] | None = None, rounds: int = 5, clients: int = 32,
                 seed: int = 0, contenders: Sequence[str] = CONTENDERS,
                 compare: Mapping[str, Path] | None = None, unbatched: bool = False) -> list[Result]:
    """Measure every contender at each concurrency on each model; results sorted by model. With
    ``compare`` (NAME -> a moat checkout), ``moat-full@NAME`` runs that code's full protection in
    the same rounds: an A/B of a change, side by side with the bare proxy."""
    requests = requests or {1: 300, 32: 1500}
    with Processes(workdir) as procs:
        addresses, keys = start_contenders(procs, workdir, clients, contenders, compare, unbatched)
        labels = [*(compare or {}), *([UNBATCHED] if unbatched else [])]
        wanted = [*contenders, *(COMPARED + label for label in labels)]
        addresses = {name: address for name, address in addresses.items() if name in wanted}
        images = distinct_images({c: requests[c] for c in concurrencies}, rounds, seed)
        results = asyncio.run(_measure(procs, addresses, keys, images, models, concurrencies, requests, rounds))
    order = {c: i for i, c in enumerate(wanted)}
    return sorted(results, key=lambda r: (r.model, r.concurrency, order[r.contender]))


def overhead_ratios(results: Sequence[Result]) -> list[dict[str, Any]]:
    """The targets: moat-full p50 <= 1.3x bare-proxy at c=1; throughput >= 0.75x bare-proxy at c=32.

    ``value`` is the ratio of the medians over rounds (what the bound is judged on); ``per_round``
    the ratio within each interleaved round, and ``spread`` their interquartile range: on a shared
    machine a ratio moves by ±0.1 between runs, and a target whose spread straddles its bound is
    within that noise, while one whose whole spread lies beyond it missed in most rounds."""
    ratios = []
    compared = sorted({r.contender for r in results if r.contender.startswith(COMPARED)})
    for model in sorted({r.model for r in results if r.scenario == "overhead"}):
        for concurrency, figure, bound, upper in ((1, "p50_ms", 1.3, True), (32, "throughput_rps", 0.75, False)):
            base = find(results, scenario="overhead", model=model, contender="bare-proxy", concurrency=concurrency)
            if base is None:
                continue
            for contender in ("direct", "moat-off", "moat-full", *compared):
                mine = find(results, scenario="overhead", model=model, contender=contender, concurrency=concurrency)
                if mine is None:
                    continue
                value = getattr(mine, figure) / getattr(base, figure)
                per_round = paired_ratios(mine, base, figure)
                target = contender == "moat-full"
                ratios.append({
                    "target": f"overhead {figure} c={concurrency} vs bare-proxy",
                    "subject": f"{model} {contender}", "value": value,
                    "per_round": per_round, "spread": quartiles(per_round),
                    "bound": (f"<= {bound}" if upper else f">= {bound}") if target else "info",
                    "holds": (value <= bound if upper else value >= bound) if target else True})
    return ratios
