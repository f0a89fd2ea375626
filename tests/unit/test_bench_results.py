"""The bench's paired per-round ratios: each round of a contender divided by the same round of its
baseline, so noise that hits both contenders of a round cancels."""

from __future__ import annotations

import numpy as np

from evaluation.bench.results import Result, Sample, median_result, paired_ratios, quartiles, ratio_table


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
