"""The report: the schema issue 5 lists, gain remaining and utility loss computed from the undefended
entries, every run's verdict, Markdown tables (the verdicts first) and PNG plots written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.report import (
    BENIGN_FIELDS,
    RUN_FIELDS,
    finalize,
    summary,
    verdict,
    write_report,
)


def run(attack: str, defense: str, agreement: float | None, kind: str = "classifier", **extra) -> dict:
    row = {"model": "m", "kind": kind, "attack": attack, "defense": defense, "queries": 1000, "api_keys": 1,
           "victim_accuracy": 0.9, "agreement": agreement, "stolen_accuracy": agreement,
           "victim_downstream_accuracy": None, "stolen_downstream_accuracy": None, "flagged_after": None,
           "blocked_after": None, "watermark_p_value": None, "moat_verify_p_value": None, "seconds": 1.0, "chance": 0.1,
           "curve": [[500, 0.5], [1000, agreement]], "coverage": []}
    row.update(extra)
    return row


def honest(defense: str, utility: float) -> dict:
    return {"model": "m", "kind": "classifier", "user": "shoes", "defense": defense, "task": "classes [5, 7]",
            "queries": 100, "utility": utility, "utility_undefended": None, "flagged": False,
            "coverage": [[100, 1.0], [200, 2.0]] if defense != "none" else []}


def sample() -> dict:
    return {"suite": "t", "seed": 0, "seconds": 3.0,
            "runs": [run("knockoff", "none", 0.9), run("knockoff", "default", 0.5, flagged_after=400,
                                                        coverage=[[250, 1.0], [500, 3.0]]),
                     run("jbda", "default", 0.3)],
            "benign": [honest("none", 0.96), honest("default", 0.955)]}


def test_gain_remaining_and_utility_loss_come_from_the_undefended_entries() -> None:
    report = finalize(sample())
    undefended, defended, unpaired = report["runs"]
    assert undefended["gain_remaining"] is None
    assert defended["gain_remaining"] == pytest.approx((0.5 - 0.1) / (0.9 - 0.1))
    assert unpaired["gain_remaining"] is None  # no undefended jbda run to compare with
    assert report["benign"][1]["utility_undefended"] == 0.96
    assert report["benign"][1]["utility_loss"] == pytest.approx(0.005)


def test_encoder_gain_uses_downstream_accuracy() -> None:
    rows = [run("direct", d, None, kind="encoder", stolen_downstream_accuracy=s) for d, s in (("none", 0.8), ("b4b", 0.45))]
    report = finalize({"suite": "t", "runs": rows, "benign": []})
    assert report["runs"][1]["gain_remaining"] == pytest.approx((0.45 - 0.1) / (0.8 - 0.1))


def test_no_gain_remaining_when_the_undefended_attack_barely_beat_chance() -> None:
    rows = [run("copycat", d, a) for d, a in (("none", 0.124), ("default", 0.186))]
    for r in rows:
        r["chance"] = 0.11
    report = finalize({"suite": "t", "runs": rows, "benign": []})
    assert report["runs"][1]["gain_remaining"] is None  # 1.4 points above chance: a ratio would be noise


def test_a_run_missing_a_required_field_is_refused() -> None:
    data = sample()
    del data["runs"][0]["watermark_p_value"]
    with pytest.raises(ValueError, match=r"missing report fields \['watermark_p_value'\]"):
        finalize(data)


def test_write_report_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    write_report(sample(), tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["suite"] == "t"
    assert all(set(RUN_FIELDS) <= set(r) for r in data["runs"])
    assert all(set(BENIGN_FIELDS) <= set(b) for b in data["benign"])
    assert data["plots"] == ["m-score.png", "m-coverage.png"]
    for name in data["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "| m | knockoff | default | 1000 | 1 | 90.0% | 50.0% | 50.0% | – | 0.500 | 400 |" in md
    assert "| m | shoes | classes [5, 7] | default | 100 | 95.5% | 96.0% | -0.5 | no |" in md
    # the verdict table comes first: model, attack, defense, queries, gain left, watermark p, verdict
    assert md.index("## Verdicts") < md.index("## What a thief got")
    assert "| m | knockoff | default | 1000 | 0.500 | – | neither |" in md
    assert data["runs"][1]["verdict"] == "neither" and "moat_verify_p_value" in data["runs"][1]


@pytest.mark.parametrize(("gain", "p", "expected"), [
    (0.2, None, "stopped"),       # at most a fifth of the gain left
    (0.21, 0.5, "neither"),
    (-0.1, 1e-7, "both"),
    (1.0, 9.9e-7, "caught"),
    (1.0, 1e-6, "neither"),       # the bar is strictly below 1e-6
    (None, 1e-9, "caught"),       # an undefended run, or a thief that got nothing anyway, can only be caught
    (None, None, "neither"),
])
def test_verdict_from_gain_left_and_the_moat_verify_p_value(gain: float | None, p: float | None,
                                                             expected: str) -> None:
    assert verdict(gain, p) == expected


def test_every_run_gets_a_verdict_and_the_summary_leads_with_them() -> None:
    data = sample()
    data["runs"][1]["agreement"] = 0.2  # gain left (0.2 - 0.1) / (0.9 - 0.1) = 0.125: stopped
    data["runs"][1]["moat_verify_p_value"] = 1e-9
    data["runs"][2]["moat_verify_p_value"] = 1e-9  # no undefended twin: no gain, but caught
    report = finalize(data)
    assert [r["verdict"] for r in report["runs"]] == ["neither", "both", "caught"]
    text = summary(report)
    assert text.startswith("Verdicts (")
    header, *rows = text.split("\n\n")[0].splitlines()[1:]
    assert header.split() == ["model", "attack", "defense", "queries", "gain", "left", "watermark", "p", "verdict"]
    assert rows[1].split() == ["m", "knockoff", "default", "1000", "0.125", "1e-09", "both"]
