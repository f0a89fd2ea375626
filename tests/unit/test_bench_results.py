"""The bench's paired per-round ratios (each round of a contender divided by the same round of its
baseline, so noise that hits both contenders of a round cancels), the contenders' CPU per request,
and ``--compare``'s checks."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from bench.cli import configure, run
from bench.procs import REPO
from bench.results import (
    Result,
    Sample,
    median_result,
    paired_ratios,
    quartiles,
    ratio_table,
    results_table,
)


def _samples(p50s_ms: list[float]) -> list[Sample]:
    return [Sample(latencies=np.full(10, p / 1e3), wall_s=1.0) for p in p50s_ms]


def test_median_result_keeps_each_round_in_order() -> None:
    result = median_result(_samples([3.0, 1.0, 2.0]), scenario="overhead", model="m", contender="c")
    assert result.p50_ms == 2.0
    assert result.extra["per_round"]["p50_ms"] == [3.0, 1.0, 2.0]
    assert result.extra["per_round"]["throughput_rps"] == [10.0, 10.0, 10.0]


def test_paired_ratios_divide_round_by_round() -> None:
    base = median_result(_samples([2.0, 4.0, 2.0, 2.0]), scenario="overhead", model="m", contender="bare")
    mine = median_result(_samples([3.0, 6.0, 2.0, 4.0]), scenario="overhead", model="m", contender="moat")
    per_round = paired_ratios(mine, base, "p50_ms")
    assert per_round == [1.5, 1.5, 1.0, 2.0]
    assert quartiles(per_round) == [1.375, 1.625]


def test_paired_ratios_need_the_same_rounds() -> None:
    base = median_result(_samples([2.0, 4.0]), scenario="overhead", model="m", contender="bare")
    mine = median_result(_samples([3.0]), scenario="overhead", model="m", contender="moat")
    assert paired_ratios(mine, base, "p50_ms") == []
    assert paired_ratios(Result("overhead", "m", "moat", p50_ms=1.0), base, "p50_ms") == []
    assert quartiles([]) is None


def test_ratio_table_shows_the_spread_where_there_is_one() -> None:
    text = ratio_table([
        {"target": "t", "subject": "a", "value": 1.2, "spread": [1.1, 1.35], "bound": "<= 1.3", "holds": True},
        {"target": "t", "subject": "b", "value": 0.5, "bound": "info", "holds": True},
    ])
    rows = text.splitlines()
    assert "rounds IQR" in rows[0]
    assert "1.10-1.35" in rows[2] and rows[3].split()[3] == "-"


def test_cpu_per_request_is_the_rounds_median_where_every_round_was_read() -> None:
    rounds = [Sample(latencies=np.full(10, 0.002), wall_s=1.0, cpu_s=cpu) for cpu in (0.03, 0.01, 0.02)]
    result = median_result(rounds, scenario="overhead", model="m", contender="moat-full")
    assert result.extra["per_round"]["cpu_ms_per_request"] == [3.0, 1.0, 2.0]
    assert result.extra["cpu_ms_per_request"] == 2.0
    assert "cpu ms" in results_table([result]).splitlines()[0]
    # no process of its own (direct), or a round not read: no figure rather than a partial one
    partial = [Sample(latencies=np.full(10, 0.002), wall_s=1.0, cpu_s=0.03), *_samples([2.0])]
    assert "cpu_ms_per_request" not in median_result(partial, scenario="overhead", model="m", contender="x").extra


def _bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(["--out", "/tmp/unused", *argv])


def test_compare_takes_a_name_and_a_moat_checkout(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = _bench_args("--scenarios", "overhead", "--compare", f"before={REPO}")
    assert args.compare == [("before", REPO.resolve())]
    for bad, message in ((f"{REPO}", "expected NAME=TREE"), (f"a b={REPO}", "expected NAME=TREE"),
                         (f"x={tmp_path}", "is not a moat checkout")):
        with pytest.raises(SystemExit) as exited:
            _bench_args("--compare", bad)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "--compare" in err and message in err
    # checked before anything starts: only with the overhead scenario, each name once
    for argv, message in ((("--scenarios", "state", "--compare", f"x={REPO}"), "applies to the overhead scenario"),
                          (("--compare", f"x={REPO}", "--compare", f"x={REPO}"), "each NAME once"),
                          (("--scenarios", "state", "--unbatched"), "--unbatched: applies to the overhead scenario"),
                          (("--compare", f"unbatched={REPO}", "--unbatched"), "'unbatched' is taken by --unbatched")):
        assert run(_bench_args(*argv)) == 2
        assert message in capsys.readouterr().err
