"""The evaluation report: ``DIR/report.json``, ``DIR/report.md`` and PNG plots.

``report.json`` holds ``suite``, ``runs`` (one per attack x defense: ``model``, ``kind``, ``attack``,
``defense`` (``none`` undefended), ``queries``, ``api_keys``, ``victim_accuracy``, ``agreement``,
``stolen_accuracy``, ``victim_downstream_accuracy``, ``stolen_downstream_accuracy`` (null where not
applicable), ``flagged_after``, ``blocked_after``, ``watermark_p_value``, ``moat_verify_p_value``,
``seconds``, plus ``gain_remaining``, ``verdict``, ``training``, ``curve`` and ``coverage``) and ``benign`` (one per honest user x defense: ``model``,
``defense``, ``task``, ``utility``, ``utility_undefended``, ``flagged``).

Gain remaining = (defended − chance) / (undefended − chance), where the score is agreement for
classifiers and stolen downstream accuracy for encoders, and chance is the majority-class rate; null
when the undefended score is less than ``MIN_GAIN`` above chance.

The verdict of a run (:func:`verdict`): ``stopped`` when the defense left the thief at most
``STOPPED_GAIN`` of its gain, ``caught`` when ``moat verify`` convicts its copy (p below ``CAUGHT_P``),
``both`` or ``neither``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["RUN_FIELDS", "BENIGN_FIELDS", "CAUGHT_P", "STOPPED_GAIN", "finalize", "render_markdown", "score",
           "summary", "verdict", "verdict_rows", "write_plots", "write_report"]

RUN_FIELDS = ("model", "kind", "attack", "defense", "queries", "api_keys", "victim_accuracy", "agreement",
              "stolen_accuracy", "victim_downstream_accuracy", "stolen_downstream_accuracy", "flagged_after",
              "blocked_after", "watermark_p_value", "moat_verify_p_value", "seconds")
BENIGN_FIELDS = ("model", "defense", "task", "utility", "utility_undefended", "flagged")
#: An attack that got less than this above chance without moat has no gain to speak of: the ratio
#: would only amplify noise (the quick suite's copycat: 12.4% agreement, chance ~11%), so it is null.
MIN_GAIN = 0.05
#: A defense that leaves the thief at most this much of its gain has stopped it.
STOPPED_GAIN = 0.2
#: A copy whose ownership test gives a p-value below this is caught (a claim to stand on its own).
CAUGHT_P = 1e-6


def verdict(gain_remaining: float | None, moat_verify_p_value: float | None) -> str:
    """``stopped`` (gain remaining <= STOPPED_GAIN), ``caught`` (p < CAUGHT_P), ``both`` or ``neither``.

    Stopping is measured against the same attack without moat, so only a defended run whose undefended
    twin beat chance by ``MIN_GAIN`` has a gain remaining and can be ``stopped``; an undefended run, or
    one whose thief got nothing even undefended (gain null), can only be ``caught`` or ``neither``.
    """
    stopped = gain_remaining is not None and gain_remaining <= STOPPED_GAIN
    caught = moat_verify_p_value is not None and moat_verify_p_value < CAUGHT_P
    return {(True, True): "both", (True, False): "stopped", (False, True): "caught"}.get((stopped, caught), "neither")


def score(run: Mapping[str, Any]) -> float | None:
    """Agreement (classifier) or stolen downstream accuracy (encoder)."""
    return run["agreement"] if run["kind"] == "classifier" else run["stolen_downstream_accuracy"]


def finalize(report: dict[str, Any]) -> dict[str, Any]:
    """Fill ``gain_remaining`` of defended runs from the matching undefended (``none``) entries, every run's
    ``verdict``, and ``utility_undefended``/``utility_loss`` of honest users; checks the required fields
    are present."""
    undefended = {(r["model"], r["attack"]): r for r in report["runs"] if r["defense"] == "none"}
    for run in report["runs"]:
        missing = [f for f in RUN_FIELDS if f not in run]
        if missing:
            raise ValueError(f"run {run.get('attack')!r}: missing report fields {missing}")
        base = undefended.get((run["model"], run["attack"]))
        run["gain_remaining"] = None
        if base is not None and run["defense"] != "none":
            s, b, chance = score(run), score(base), run.get("chance", 0.0)
            if s is not None and b is not None and b - chance >= MIN_GAIN:
                run["gain_remaining"] = round((s - chance) / (b - chance), 4)
        run["verdict"] = verdict(run["gain_remaining"], run["moat_verify_p_value"])
    honest = {(b["model"], b.get("user", b["task"])): b for b in report["benign"] if b["defense"] == "none"}
    for user in report["benign"]:
        base = honest.get((user["model"], user.get("user", user["task"])))
        user["utility_undefended"] = None if base is None else base["utility"]
        user["utility_loss"] = None if base is None else round(base["utility"] - user["utility"], 4)
    return report


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if pct:
            return f"{100 * value:.1f}%"
        return f"{value:.2g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"
    return str(value)


VERDICT_HEADER = ("model", "attack", "defense", "queries", "gain left", "watermark p", "verdict")
VERDICT_NOTE = (f"verdict: stopped = gain left <= {STOPPED_GAIN}, caught = moat verify p < {CAUGHT_P:g}, both, "
                "neither; undefended runs (defense none) can only be caught")


def verdict_rows(report: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """One row per run: :data:`VERDICT_HEADER`'s columns, formatted."""
    return [(r["model"], r["attack"], r["defense"], str(r["queries"]), _fmt(r.get("gain_remaining")),
             _fmt(r.get("moat_verify_p_value")), r.get("verdict") or "–") for r in report["runs"]]


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the verdicts first, then one table of attacks, one of honest users, and how
    to read them."""
    lines = [f"# moat evaluation: suite `{report['suite']}`", "", "## Verdicts", "",
             f"{VERDICT_NOTE.capitalize()}.", "", "| " + " | ".join(VERDICT_HEADER) + " |",
             "|---|---|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in verdict_rows(report)]
    lines += ["", f"Seed {report.get('seed')}, {report.get('seconds', 0):.0f} s in all. Score = agreement with the victim "
             "(classifiers) or the stolen encoder's linear-probe downstream accuracy (encoders). "
             "Gain remaining = (defended − chance) / (undefended − chance). Fidelity (encoders): R² of a "
             "linear map from the copy's representation to the victim's on held-out images.", "",
             "## What a thief got", "",
             "| model | attack | defense | queries | keys | victim | score | stolen acc. | fidelity R² "
             "| gain remaining | flagged after | blocked after | watermark p | s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        victim = r["victim_accuracy"] if r["kind"] == "classifier" else r["victim_downstream_accuracy"]
        lines.append(f"| {r['model']} | {r['attack']} | {r['defense']} | {r['queries']} | {r['api_keys']} | "
                     f"{_fmt(victim, True)} | {_fmt(score(r), True)} | {_fmt(r['stolen_accuracy'], True)} | "
                     f"{_fmt(r.get('embedding_fidelity'))} | "
                     f"{_fmt(r.get('gain_remaining'))} | {_fmt(r['flagged_after'])} | {_fmt(r['blocked_after'])} | "
                     f"{_fmt(r['watermark_p_value'])} | {r['seconds']:.0f} |")
    lines += ["", "## What honest users lost", "",
              "| model | user | task | defense | queries | utility | undefended | change (points) | flagged |",
              "|---|---|---|---|---:|---:|---:|---:|---|"]
    for b in report["benign"]:
        loss = None if b.get("utility_loss") is None else -100 * b["utility_loss"]
        lines.append(f"| {b['model']} | {b.get('user', '')} | {b['task']} | {b['defense']} | {b.get('queries', '')} | "
                     f"{_fmt(b['utility'], True)} | {_fmt(b['utility_undefended'], True)} | "
                     f"{'–' if loss is None else f'{loss:+.1f}'} | {'yes' if b['flagged'] else 'no'} |")
    plots = report.get("plots", [])
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def summary(report: Mapping[str, Any]) -> str:
    """Plain-text tables: every run's verdict first, then each attack's score without and with each
    defense (and the gain that remains), then each honest user's utility without and with it, and
    whether it was flagged."""
    base = {(r["model"], r["attack"]): r for r in report["runs"] if r["defense"] == "none"}
    rows = [("model", "attack", "defense", "without moat", "with moat", "gain left", "flagged at")]
    for r in report["runs"]:
        if r["defense"] == "none":
            continue
        b = base.get((r["model"], r["attack"]))
        rows.append((r["model"], r["attack"], r["defense"], _fmt(None if b is None else score(b), True),
                     _fmt(score(r), True), _fmt(r.get("gain_remaining")), _fmt(r["flagged_after"])))
    users = [("model", "honest user", "defense", "without moat", "with moat", "flagged", "")]
    for u in report["benign"]:
        if u["defense"] != "none":
            users.append((u["model"], u.get("user", u["task"]), u["defense"], _fmt(u["utility_undefended"], True),
                          _fmt(u["utility"], True), "yes" if u["flagged"] else "no", ""))

    def table(lines: list[tuple[str, ...]]) -> str:
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
        return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                         for line in lines)

    score_note = "score: agreement with the victim (classifiers), stolen linear-probe accuracy (encoders)"
    verdicts = table([VERDICT_HEADER, *verdict_rows(report)])
    return (f"Verdicts ({VERDICT_NOTE}):\n{verdicts}\n\nWhat a thief got ({score_note}):\n{table(rows)}\n\n"
            f"What honest users kept:\n{table(users)}\n")


def _plot_curves(runs: Sequence[Mapping[str, Any]], model: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, Any] = {}
    for r in runs:
        pts = [(q, v) for q, v in r.get("curve", []) if v is not None]
        if not pts:
            continue
        color = colors.setdefault(r["attack"], f"C{len(colors) % 10}")
        style = "-" if r["defense"] == "none" else "--"
        ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, color=color, label=f"{r['attack']} ({r['defense']})")
    kind = runs[0]["kind"] if runs else "classifier"
    ax.set_xlabel("queries answered")
    ax.set_ylabel("agreement with the victim" if kind == "classifier" else "stolen downstream accuracy")
    ax.set_title(f"{model}: undefended (solid) vs defended (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_coverage(runs: Sequence[Mapping[str, Any]], benign: Sequence[Mapping[str, Any]], model: str,
                   path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(runs):
        if r.get("coverage"):
            ax.plot(*zip(*r["coverage"], strict=True), "-", color=f"C{i % 10}", label=f"thief {r['attack']} ({r['defense']})")
    for b in benign:
        if b.get("coverage"):
            ax.plot(*zip(*b["coverage"], strict=True), ":", lw=2, color="k", alpha=0.7,
                    label=f"honest {b.get('user', b['task'])} ({b['defense']})")
    ax.set_xlabel("queries answered (all keys of the client)")
    ax.set_ylabel("coverage % (gateway's view, mean over keys)")
    ax.set_title(f"{model}: coverage, thieves vs honest users")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(report: Mapping[str, Any], out: Path) -> list[str]:
    """One metric-vs-queries plot per model and one coverage plot per model with coverage data."""
    import matplotlib

    matplotlib.use("Agg")
    names = []
    for model in dict.fromkeys(r["model"] for r in report["runs"]):
        runs = [r for r in report["runs"] if r["model"] == model]
        name = f"{model}-score.png"
        _plot_curves(runs, model, out / name)
        names.append(name)
        benign = [b for b in report["benign"] if b["model"] == model]
        if any(r.get("coverage") for r in runs) or any(b.get("coverage") for b in benign):
            name = f"{model}-coverage.png"
            _plot_coverage([r for r in runs if r["defense"] != "none"], [b for b in benign if b["defense"] != "none"],
                           model, out / name)
            names.append(name)
    return names


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_report(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """Finalize ``report`` and write ``report.json``, the PNG plots and ``report.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    report = finalize(report)
    report["plots"] = write_plots(report, out)
    report = _clean(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    return report
