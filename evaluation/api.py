"""The evaluation suite as a Python API: run a suite, get the report (what ``moat evaluate`` does).

    from evaluation import evaluate
    report = evaluate("quick", "out/")            # a built-in suite, or a YAML path, or a Suite
    for run in report["runs"]:
        print(run["model"], run["attack"], run["defense"], run["verdict"], run["agreement"])

Importing this module is light; torch and the runner load when :func:`evaluate` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evaluation.runner import Target
    from evaluation.suite import Suite


def evaluate(suite: str | Path | Suite, out: str | Path, *, target: Target | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Run ``suite`` (a built-in name such as ``quick``, a YAML path, or a loaded
    :class:`~evaluation.suite.Suite`) against the gateways it starts, or against ``target`` (an
    endpoint someone else runs), write ``report.json``, ``report.md`` and the plots to ``out``, and
    return the report: ``runs`` (one dict per attack and defense, fields in
    :data:`evaluation.report.RUN_FIELDS`), ``benign`` (one per honest user and defense) and ``plots``.
    ``SuiteError`` names a bad field of the suite."""
    from evaluation.report import write_report
    from evaluation.runner import Runner
    from evaluation.suite import Suite, load_suite

    loaded = suite if isinstance(suite, Suite) else load_suite(str(suite))
    directory = Path(out).resolve()  # the gateway configs written there name their keys files by path
    directory.mkdir(parents=True, exist_ok=True)
    return write_report(Runner(loaded, directory, progress=progress, target=target).run(), directory)
