"""`moat clients top`: the ranking of client-model states, and its argument checks. The live command
against a real gateway is exercised in tests/e2e/test_prometheus.py."""

from __future__ import annotations

import pytest

from gateway.cli import main, top_clients


def _client(cid: str, *states: tuple[str, int, float, float, str]) -> dict:
    return {"client_id": cid, "tier": "standard", "models": [
        {"model": m, "queries": q, "coverage": cov, "suspicion": s, "status": st} for m, q, cov, s, st in states]}


CLIENTS = [
    _client("alice", ("enc", 300, 1.2, 0.05, "ok"), ("cls", 50, 0.0, 0.0, "ok")),
    _client("bob", ("enc", 3000, 12.0, 1.0, "blocked")),
    _client("carol", ("enc", 9000, 4.0, 0.4, "flagged"), ("cls", 10, 0.0, 0.4, "ok")),
    _client("dave"),  # never queried a protected model: no rows
]


def test_top_ranks_by_suspicion_then_coverage_then_queries() -> None:
    rows = top_clients(CLIENTS)
    assert [(r["client"], r["model"]) for r in rows] == [
        ("bob", "enc"), ("carol", "enc"), ("carol", "cls"), ("alice", "enc"), ("alice", "cls")]
    assert rows[0] == {"client": "bob", "tier": "standard", "model": "enc", "queries": 3000, "coverage": 12.0,
                       "suspicion": 1.0, "status": "blocked"}


@pytest.mark.parametrize(("by", "first"), [("coverage", ("bob", "enc")), ("queries", ("carol", "enc"))])
def test_top_by_another_figure(by: str, first: tuple[str, str]) -> None:
    row = top_clients(CLIENTS, by=by)[0]
    assert (row["client"], row["model"]) == first


def test_top_limits_rows_and_filters_one_model() -> None:
    assert [r["client"] for r in top_clients(CLIENTS, limit=2)] == ["bob", "carol"]
    assert [r["client"] for r in top_clients(CLIENTS, model="cls")] == ["carol", "alice"]
    assert top_clients(CLIENTS, model="nope") == []


def test_top_refuses_a_limit_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["clients", "top", "-n", "0"]) == 2
    assert "--limit must be at least 1, got 0" in capsys.readouterr().err


def test_top_refuses_an_unknown_ranking(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["clients", "top", "--by", "luck"])
    assert exit_.value.code == 2 and "invalid choice: 'luck'" in capsys.readouterr().err
