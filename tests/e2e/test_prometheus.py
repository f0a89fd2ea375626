"""A real Prometheus (Debian's `prometheus`) on loopback scrapes a real `moat serve` and evaluates
deploy/prometheus/rules.yaml: the extraction alert stays quiet for an honest key and fires once a
thief crosses the coverage threshold, and every query of deploy/grafana/moat.json returns data,
so no panel refers to a metric the gateway does not export."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from tritonclient.utils import InferenceServerException

from evaluation.data import load_fashion_mnist
from tests.e2e.conftest import (
    client,
    infer_input,
    key_of,
    model_state,
    protected_config,
    query,
)
from tests.servers.procs import REPO, Proc, free_port, start_gateway, wait_until

ENCODER = "fashion-encoder"
DEAD = "dead-upstream"
RULES = REPO / "deploy" / "prometheus" / "rules.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "moat.json"
ALERT_COVERAGE = 3.0


def _edit(dead_port: int):
    def edit(data: dict) -> None:
        encoder = data["models"][0]
        # A low threshold so a thief crosses it in a couple of thousand queries (the demo uses 15%
        # over 10,000); b4b stays on so defense actions are counted.
        encoder["detectors"] = [{"name": "coverage",
                                 "params": {"tables": 20, "bits": 12, "alert_coverage": ALERT_COVERAGE}}]
        # An upstream model whose server is down: UNAVAILABLE answers and moat_model_ready == 0
        # feed the upstream-health panels and the error-ratio query.
        data["models"].append({"name": DEAD, "kind": "classifier", "backend": {
            "name": "upstream", "params": {"address": f"127.0.0.1:{dead_port}", "timeout_seconds": 2}}})
    return edit


class PrometheusServer:
    def __init__(self, workdir: Path, metrics_port: int) -> None:
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "moat",
                                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
        }))
        self.log = workdir / "prometheus.log"
        with self.log.open("w") as handle:
            self.popen = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def firing(self) -> set[tuple[str, str]]:
        return {(a["labels"]["alertname"], a["labels"].get("model", "")) for a in self.api("alerts")["alerts"]
                if a["state"] == "firing"}

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)


def _target_up(prom: PrometheusServer) -> bool:
    if prom.popen.poll() is not None:
        raise RuntimeError(f"prometheus exited:\n{prom.log.read_text()[-3000:]}")
    try:
        targets = prom.api("targets")["activeTargets"]
    except OSError:
        return False
    return any(t["labels"]["job"] == "moat" and t["health"] == "up" for t in targets)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, PrometheusServer]]:
    workdir = tmp_path_factory.mktemp("prometheus")
    state = {"name": "sqlite", "params": {"path": str(workdir / "state.db")}}
    config = protected_config(workdir / "moat.yaml", state, models=[ENCODER], edit=_edit(free_port()))
    gateway = start_gateway(config, workdir)
    prom = None
    try:
        prom = PrometheusServer(workdir, gateway.info["metrics"])
        wait_until(lambda: _target_up(prom), 30, "Prometheus to scrape the gateway", interval=0.5)
        yield gateway, prom
    finally:
        if prom is not None:
            prom.stop()
        assert gateway.stop() == 0


def _extraction_expr() -> str:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    return next(r["expr"] for r in rules if r.get("alert") == "MoatExtractionAlert")


def _scraped(prom: PrometheusServer, expr: str, at_least: float) -> bool:
    result = prom.query(expr)
    return bool(result) and float(result[0]["value"][1]) >= at_least


def test_extraction_alert_fires_for_the_thief_only(stack: tuple[Proc, PrometheusServer]) -> None:
    gateway, prom = stack
    data = load_fashion_mnist("train")
    # Honest: a narrow task (sneakers vs ankle boots), a few hundred images.
    narrow = data.images[np.isin(data.labels, [7, 9])][:300]
    query(gateway, ENCODER, "alice", narrow, batch=50)
    # Upstream health and errors: readiness checks refresh moat_model_ready, the dead upstream
    # answers UNAVAILABLE.
    assert client(gateway).is_server_ready(headers=key_of("alice")) is False
    _call_dead_upstream(gateway)
    # Wait until Prometheus has scraped all of it, then the alert expression must still be empty.
    wait_until(lambda: _scraped(prom, f'sum(moat_requests_total{{model="{ENCODER}",code="OK"}})', 6),
               20, "the honest requests in Prometheus", interval=0.5)
    time.sleep(2)  # a couple more evaluations of the rules
    assert model_state(gateway, "alice", ENCODER)["coverage"] < ALERT_COVERAGE
    assert prom.query(_extraction_expr()) == []
    assert ("MoatExtractionAlert", ENCODER) not in prom.firing()

    # The thief samples every class.
    thief = data.images[np.random.default_rng(0).permutation(len(data.images))[:3000]]
    query(gateway, ENCODER, "bob", thief, batch=100)
    bob = model_state(gateway, "bob", ENCODER)
    assert bob["coverage"] >= ALERT_COVERAGE and bob["status"] != "ok", bob
    assert model_state(gateway, "alice", ENCODER)["status"] == "ok"
    # The on-call view: `moat clients top` ranks the thief first, in a table and as JSON.
    top = _moat(gateway, "clients", "top", "--model", ENCODER, "--json")
    rows = json.loads(top)["clients"]
    assert [r["client"] for r in rows][:2] == ["bob", "alice"] and rows[0]["suspicion"] > rows[1]["suspicion"]
    assert rows[0]["coverage"] == pytest.approx(bob["coverage"])
    table = _moat(gateway, "clients", "top", "--by", "coverage", "-n", "1").splitlines()
    assert table[0].split()[:3] == ["client", "tier", "model"] and table[1].split()[0] == "bob" and len(table) == 2

    # `or None`: an empty result means "not yet" (wait_until only keeps polling on None or False).
    result = wait_until(lambda: prom.query(_extraction_expr()) or None, 20, "the extraction alert expression",
                        interval=0.5)
    assert [(r["metric"]["model"], r["metric"]["detector"]) for r in result] == [(ENCODER, "coverage")]
    wait_until(lambda: ("MoatExtractionAlert", ENCODER) in prom.firing(), 20, "MoatExtractionAlert firing",
               interval=0.5)
    assert not {name for name, _ in prom.firing()} & {"MoatGatewayDown", "MoatLatencySLO"}
    # A second failure, scrapes after the first, so the upstream-error rate is above zero.
    _call_dead_upstream(gateway)


def _moat(gateway: Proc, *args: str) -> str:
    """Run the `moat` admin CLI against ``gateway``; its stdout."""
    result = subprocess.run([sys.executable, "-m", "gateway.cli", *args, "--admin",
                             f"127.0.0.1:{gateway.info['admin']}", "--token", "test-admin-token"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _call_dead_upstream(gateway: Proc) -> None:
    with pytest.raises(InferenceServerException) as error:
        client(gateway).infer(DEAD, [infer_input("x", np.zeros((1, 4), np.float32), "FP32")],
                              headers=key_of("alice"))
    assert "UNAVAILABLE" in str(error.value.status())


def _exported_names(gateway: Proc) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.info['metrics']}/metrics", timeout=5) as response:
        return response.read().decode()


def test_every_dashboard_query_returns_data(stack: tuple[Proc, PrometheusServer]) -> None:
    gateway, prom = stack
    # Runs after the thief test (file order): all traffic kinds have been seen. The 5-minute
    # window stands in for Grafana's $__rate_interval and covers this whole module's traffic.
    # Rates need two samples of a series: wait until the latest counters have a few.
    for series in ("moat_alerts_total", f'moat_requests_total{{model="{DEAD}"}}'):
        wait_until(lambda: _scraped(prom, f"min(count_over_time({series}[5m]))", 3), 20, f"samples of {series}",
                   interval=0.5)
    wait_until(lambda: _scraped(prom, f'sum(moat_requests_total{{model="{DEAD}"}})', 2), 20,
               "both upstream failures in Prometheus", interval=0.5)
    dashboard = json.loads(DASHBOARD.read_text())
    exposition = _exported_names(gateway)
    checked, empty = 0, []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "5m").replace('"$model"', '".*"')
            assert "$" not in expr, f"unsubstituted variable in {panel['title']!r}: {expr}"
            result = prom.query(expr)
            values = [float(r["value"][1]) for r in result]
            if not values or all(math.isnan(v) for v in values):
                empty.append((panel["title"], expr))
            checked += 1
    # Each demo model's watermark is in force, and the encoder's direction watermark marked some of
    # the thief's answers.
    assert 'moat_watermark{model="fashion-encoder",watermark="direction"} 1.0' in exposition
    assert "moat_watermarked_answers_total{" in exposition
    assert empty == []
    assert checked >= 20
