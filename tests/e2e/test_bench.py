"""`moat bench --quick` runs every scenario end to end (real KServe, proxy, gateways, redis-server)
and writes a bench.json from which the target ratios can be recomputed. Toy sizes: this checks the
harness and the file's schema, never speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.components import WARM_UP_CALLS, like_history
from tests.servers.procs import REPO

FIELDS = {"scenario", "model", "contender", "concurrency", "history", "clients", "p50_ms", "p99_ms",
          "throughput_rps", "bytes_per_client"}


def test_quick_bench_writes_every_scenario(tmp_path: Path) -> None:
    # --compare serves a second moat-full from a checkout (here this one: an A/A) in the same rounds,
    # --unbatched a third with no upstream batching
    run = subprocess.run([sys.executable, "-m", "gateway.cli", "bench", "--quick", "--out", str(tmp_path),
                          "--compare", f"same={REPO}", "--unbatched"],
                         cwd=REPO, capture_output=True, text=True, timeout=240, env=os.environ.copy())
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((tmp_path / "bench.json").read_text())
    results = data["results"]
    assert all(FIELDS <= set(r) for r in results)
    assert {r["scenario"] for r in results} == {"overhead", "detectors", "state", "embedded"}
    overhead = {(r["model"], r["contender"], r["concurrency"]) for r in results if r["scenario"] == "overhead"}
    assert overhead == {(m, c, k) for m in ("fashion-classifier", "fashion-encoder")
                        for c in ("direct", "bare-proxy", "moat-off", "moat-full", "moat-full@same",
                                  "moat-full@unbatched") for k in (1, 32)}
    # the CPU per request of each contender's own process (none for direct: KServe is everyone's)
    cpu = {r["contender"]: r["extra"].get("cpu_ms_per_request") for r in results if r["scenario"] == "overhead"}
    assert cpu["direct"] is None
    assert all(cpu[c] > 0 for c in ("bare-proxy", "moat-off", "moat-full", "moat-full@same", "moat-full@unbatched"))
    for compared_name in ("moat-full@same", "moat-full@unbatched"):
        compared = [r for r in data["ratios"] if r["subject"].endswith(compared_name)]
        assert len(compared) == 4 and all(r["bound"] == "info" for r in compared)
    timed = [r for r in results if r["bytes_per_client"] is None]
    assert all(r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] and r["throughput_rps"] > 0 for r in timed)
    detectors = {r["contender"] for r in results if r["scenario"] == "detectors"}
    assert {"prada", "coverage", "b4b[ok]", "b4b[flagged]", "misinformation[ok]", "misinformation[flagged]",
            "watermark:dawn[flagged]", "protect", "protect[active]"} <= detectors
    # the 10-vs-many-clients measurement on clients of like history, and beside it the many-client
    # store with as few asking, and as many clients of one query each
    protect = {(r["store"], r["contender"], r["clients"]): r for r in results if r["contender"].startswith("protect")}
    assert set(protect) == {(s, c, n) for s in ("sqlite", "redis") for c, n in
                            (("protect", 10), ("protect", 200), ("protect[active]", 200), ("protect[young]", 200))}
    assert all(protect[s, "protect[active]", 200]["extra"]["asking_clients"] == 10 for s in ("sqlite", "redis"))
    # each result's askers' median history over the timing (quick: 2 rounds of 50 calls after the
    # warm-up): the 200 populated with the 10's, then asked as the 200 are; the 10 of those 200
    # asking, aged as the 10; the young populated with one query
    grown = like_history((10, 200), calls=50, rounds=2)
    by_10, by_200 = (WARM_UP_CALLS + 50) // 10, (WARM_UP_CALLS + 50) // 200
    assert grown == 1 + by_10
    assert {(c, n, r["history"]) for (_, c, n), r in protect.items()} == {
        ("protect", 10, grown), ("protect", 200, grown + by_200), ("protect[active]", 200, grown + by_10),
        ("protect[young]", 200, 1 + by_200)}
    clients_ratios = [r for r in data["ratios"] if r["target"].startswith("protect cost")]
    assert sorted((r["target"], r["bound"]) for r in clients_ratios) == sorted(
        [("protect cost with 200 / 10 clients", "<= 1.2")] * 2
        + [("protect cost with 200 stored, 10 asking / 10", "info")] * 2
        + [("protect cost with 200 clients of 1 query / 10", "info")] * 2)
    # each protect measurement's parts, and beside the target their ratios, from the results
    assert all(set(r["extra"]["parts_p50_ms"]) == {"detect", "defend", "commit"}
               and all(ms > 0 for ms in r["extra"]["parts_p50_ms"].values()) for r in protect.values())
    parts = [r for r in data["ratios"] if r["target"] == "protect part with 200 / 10 clients"]
    assert len(parts) == 6 and all(r["bound"] == "info" for r in parts)
    detect = next(r for r in parts if r["subject"].startswith("fashion-encoder detect sqlite"))
    assert abs(detect["value"] - protect["sqlite", "protect", 200]["extra"]["parts_p50_ms"]["detect"]
               / protect["sqlite", "protect", 10]["extra"]["parts_p50_ms"]["detect"]) < 1e-9
    active = next(r for r in clients_ratios if "asking" in r["target"] and r["subject"].endswith("sqlite"))
    assert abs(active["value"] - protect["sqlite", "protect[active]", 200]["p50_ms"]
               / protect["sqlite", "protect", 10]["p50_ms"]) < 1e-9
    assert {r["history"] for r in results if r["scenario"] == "detectors" and r["clients"] == 1} == {100, 1000}
    sizes = {r["store"]: r["bytes_per_client"] for r in results if r["bytes_per_client"] is not None}
    assert set(sizes) == {"sqlite", "redis"} and all(size > 0 for size in sizes.values())
    # the ratios in the file follow from its results
    full = next(r for r in results if (r["scenario"], r["model"], r["contender"], r["concurrency"])
                == ("overhead", "fashion-encoder", "moat-full", 1))
    proxy = next(r for r in results if (r["scenario"], r["model"], r["contender"], r["concurrency"])
                 == ("overhead", "fashion-encoder", "bare-proxy", 1))
    ratio = next(r for r in data["ratios"] if r["subject"] == "fashion-encoder moat-full" and "c=1" in r["target"])
    assert abs(ratio["value"] - full["p50_ms"] / proxy["p50_ms"]) < 1e-9
    # ...and so do its per-round ratios (each interleaved round of moat-full over the same round
    # of the bare proxy) and their interquartile range
    rounds = zip(full["extra"]["per_round"]["p50_ms"], proxy["extra"]["per_round"]["p50_ms"], strict=True)
    assert ratio["per_round"] == [mine / base for mine, base in rounds]
    assert min(ratio["per_round"]) <= ratio["spread"][0] <= ratio["spread"][1] <= max(ratio["per_round"])
    assert "moat-full" in run.stdout and "bare-proxy" in run.stdout


def test_overhead_clients_send_each_image_once() -> None:
    import numpy as np

    from bench.overhead import WARM_UP, distinct_images, test_images

    images = distinct_images({1: 300, 32: 1500}, rounds=7, seed=0)  # past the test set's 10,000
    assert len(images) == WARM_UP[1] + 7 * 1800
    assert len(np.unique(images.reshape(len(images), -1), axis=0)) == len(images)
    with pytest.raises(ValueError, match="70000"):
        test_images(70_001, seed=0)
