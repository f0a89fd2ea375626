"""Bench results: one :class:`Result` per measurement, medians over rounds, the JSON file and tables.

``bench.json`` is ``{"machine": {...}, "command": "...", "results": [Result, ...], "ratios": [...]}``;
every figure of the README's table can be recomputed from ``results``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

RESULT_FIELDS = ("scenario", "model", "contender", "concurrency", "history", "clients",
                 "p50_ms", "p99_ms", "throughput_rps", "bytes_per_client", "store", "batch")


@dataclass
class Result:
    """One measurement. ``None`` where a field does not apply (e.g. ``history`` in ``overhead``)."""

    scenario: str
    model: str
    contender: str
    concurrency: int | None = None
    history: int | None = None
    clients: int | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput_rps: float | None = None
    bytes_per_client: float | None = None
    store: str | None = None  # the state store, where one is involved
    batch: int | None = None  # queries per request, where it is not 1
    rounds: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    """One round of one contender: request latencies (seconds, float [n]), the round's wall time,
    and the CPU time its own process (proxy or gateway) used in it, where it has one."""

    latencies: np.ndarray
    wall_s: float
    cpu_s: float | None = None

    @property
    def cpu_ms_per_request(self) -> float | None:
        return None if self.cpu_s is None else self.cpu_s * 1e3 / len(self.latencies)

    @property
    def p50_ms(self) -> float:
        return float(np.percentile(self.latencies, 50) * 1e3)

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies, 99) * 1e3)

    @property
    def throughput_rps(self) -> float:
        return len(self.latencies) / self.wall_s


def median_result(samples: Sequence[Sample], **key: Any) -> Result:
    """The median over rounds of each figure (rounds are interleaved with other contenders); each
    round's figures are kept in ``extra["per_round"]``, in round order, for paired ratios. Where
    the contender's process CPU was read, ``extra["cpu_ms_per_request"]`` is its median over
    rounds (on a machine the client and the model server share, CPU per request is what
    throughput under load follows)."""
    per_round: dict[str, list[float]] = {
        "p50_ms": [s.p50_ms for s in samples], "p99_ms": [s.p99_ms for s in samples],
        "throughput_rps": [s.throughput_rps for s in samples]}
    extra: dict[str, Any] = {"per_round": per_round}
    cpu = [s.cpu_ms_per_request for s in samples]
    if samples and all(c is not None for c in cpu):
        per_round["cpu_ms_per_request"] = cast(list[float], cpu)
        extra["cpu_ms_per_request"] = statistics.median(per_round["cpu_ms_per_request"])
    return Result(
        **key,
        p50_ms=statistics.median(per_round["p50_ms"]),
        p99_ms=statistics.median(per_round["p99_ms"]),
        throughput_rps=statistics.median(per_round["throughput_rps"]),
        rounds=len(samples),
        extra=extra,
    )


def paired_ratios(mine: Result, base: Result, figure: str) -> list[float]:
    """``mine``'s figure over ``base``'s, round by round (both measured in the same interleaved
    rounds); empty when either lacks per-round figures or their rounds differ."""
    ours = mine.extra.get("per_round", {}).get(figure, [])
    theirs = base.extra.get("per_round", {}).get(figure, [])
    if not ours or len(ours) != len(theirs):
        return []
    return [a / b for a, b in zip(ours, theirs, strict=True)]


def quartiles(values: Sequence[float]) -> list[float] | None:
    """The 25th and 75th percentiles of ``values`` (None when there are none)."""
    if not values:
        return None
    return [float(np.percentile(values, 25)), float(np.percentile(values, 75))]


def find(results: Iterable[Result], **key: Any) -> Result | None:
    """The first result whose fields equal ``key`` (None if there is none)."""
    for result in results:
        if all(getattr(result, name) == value for name, value in key.items()):
            return result
    return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def write_json(path: Path, results: Sequence[Result], ratios: Sequence[dict[str, Any]], command: str) -> None:
    payload = {"machine": machine(), "command": command,
               "results": [asdict(r) for r in results], "ratios": list(ratios)}
    path.write_text(json.dumps(payload, indent=2, default=float))


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def table(rows: Sequence[Sequence[Any]], head: Sequence[str]) -> str:
    """A plain-text table with right-aligned columns."""
    cells = [list(head)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_table(results: Sequence[Result]) -> str:
    """Every result; ``cpu ms`` is the contender's own process's CPU per request (overhead)."""
    rows = [[r.scenario, r.model, r.contender, r.store, r.batch, r.concurrency, r.history, r.clients, r.p50_ms,
             r.p99_ms, r.throughput_rps, r.extra.get("cpu_ms_per_request"), r.bytes_per_client] for r in results]
    return table(rows, ["scenario", "model", "contender", "store", "batch", "conc", "history", "clients",
                        "p50 ms", "p99 ms", "per s", "cpu ms", "B/client"])


def ratio_table(ratios: Sequence[dict[str, Any]]) -> str:
    """Each ratio, its bound and verdict; ``rounds IQR`` is the interquartile range of the paired
    per-round ratios, where the scenario has them (how far the machine's noise moves the ratio)."""
    rows = [[r["target"], r["subject"], r["value"], _spread(r.get("spread")), r["bound"], "yes" if r["holds"] else "NO"]
            for r in ratios]
    return table(rows, ["target", "subject", "ratio", "rounds IQR", "bound", "holds"])


def _spread(spread: Sequence[float] | None) -> str:
    return "-" if not spread else f"{spread[0]:.2f}-{spread[1]:.2f}"
