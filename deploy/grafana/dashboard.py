"""Generate the moat Grafana dashboard with grafanalib (never hand-edit moat.json).

    .venv/bin/python deploy/grafana/dashboard.py          # writes deploy/grafana/moat.json and the chart's copy
    .venv/bin/python deploy/grafana/dashboard.py --check  # exit 1 if either file is stale

tests/unit/test_deploy.py fails when the committed JSON differs from what this script generates,
and tests/e2e/test_prometheus.py runs every query below against a live Prometheus scraping a
live gateway. Queries use two template variables: ``$datasource`` (any Prometheus) and
``$model`` (the gateway's configured model names), plus Grafana's ``$__rate_interval``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafanalib._gen import DashboardEncoder
from grafanalib.core import (
    Dashboard, GridPos, Heatmap, RowPanel, Stat, Target, Template, Templating, Time, TimeSeries,
)

HERE = Path(__file__).resolve().parent
OUTPUTS = (HERE / "moat.json", HERE.parent / "helm" / "moat" / "files" / "moat.json")
DS = "${datasource}"
M = 'model=~"$model"'
RATE = "$__rate_interval"
WIDTH = 24


def ts(title: str, exprs: list[tuple[str, str]], unit: str = "", description: str = "", **kw) -> TimeSeries:
    return TimeSeries(
        title=title, description=description, dataSource=DS, unit=unit,
        targets=[Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + i))
                 for i, (expr, legend) in enumerate(exprs)],
        **kw,
    )


def quantiles(metric: str, by: str, selector: str = M) -> list[tuple[str, str]]:
    legend = " ".join("{{%s}}" % label for label in by.split(", "))
    return [(f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
             f"p{int(q * 100)} {legend}") for q in (0.5, 0.9, 0.99)]


def heatmap(title: str, metric: str, description: str) -> Heatmap:
    return Heatmap(
        title=title, description=description, dataSource=DS, dataFormat="tsbuckets",
        targets=[Target(expr=f"sum by (le) (increase({metric}_bucket{{{M}}}[{RATE}]))",
                        legendFormat="{{le}}", format="heatmap", refId="A")],
        yBucketBound="upper", hideZeroBuckets=True,
    )


def rows() -> list[tuple[str, list[tuple[object, int]]]]:
    """(row title, [(panel, width)]) in display order; each row is 8 units high."""
    traffic = [
        (ts("Request rate by model and code",
            [(f"sum by (model, code) (rate(moat_requests_total{{{M}}}[{RATE}]))", "{{model}} {{code}}")],
            unit="reqps", description="ModelInfer calls per second by gRPC status code."), 8),
        (ts("Error ratio by model",
            [(f'sum by (model) (rate(moat_requests_total{{{M}, code!="OK"}}[{RATE}]))'
              f" / sum by (model) (rate(moat_requests_total{{{M}}}[{RATE}]))", "{{model}}")],
            unit="percentunit",
            description="Share of calls not answered OK (refusals of throttled/blocked keys included)."), 8),
        (ts("Latency by model (end to end inside moat)",
            quantiles("moat_request_duration_seconds", "model"), unit="s"), 8),
        (ts("Backend latency (model server or embedded model)",
            quantiles("moat_backend_duration_seconds", "model, backend"), unit="s"), 8),
        (ts("Stage latency p99 (admission, detect, defend)",
            [(f"histogram_quantile(0.99, sum by (model, stage, le) "
              f"(rate(moat_stage_duration_seconds_bucket{{{M}}}[{RATE}])))", "{{model}} {{stage}}")],
            unit="s"), 8),
        (ts("In-flight requests and message sizes",
            [("sum(moat_inflight_requests)", "in flight"),
             (f"histogram_quantile(0.99, sum by (model, le) (rate(moat_request_size_bytes_bucket{{{M}}}[{RATE}])))",
              "p99 request bytes {{model}}"),
             (f"histogram_quantile(0.99, sum by (model, le) (rate(moat_response_size_bytes_bucket{{{M}}}[{RATE}])))",
              "p99 response bytes {{model}}")]), 8),
        (ts("Rows per backend batch (mean)",
            [(f"sum by (model, backend) (rate(moat_backend_batch_rows_sum{{{M}}}[{RATE}]))"
              f" / sum by (model, backend) (rate(moat_backend_batch_rows_count{{{M}}}[{RATE}]))",
              "{{model}} {{backend}}")],
            description="Mean rows per embedded forward pass or per upstream call (max_batch_rows > 1 coalesces "
                        "concurrent requests): near 1 with batching on means requests rarely overlap."), 8),
    ]
    extraction = [
        (ts("Extraction alerts by detector",
            [(f"sum by (model, detector) (increase(moat_alerts_total{{{M}}}[{RATE}]))", "{{model}} {{detector}}"),
             (f"sum by (model, detector) (moat_alerts_total{{{M}}})", "{{model}} {{detector}} (since start)")],
            description="Alerts raised per interval, and the running count since each replica started "
                        "(the first alert of a detector shows as a step of the running count). "
                        "Who raised them: `moat alerts`."), 12),
        (ts("Flagged, throttled and blocked keys",
            [(f"sum by (model, status) (moat_flagged_clients{{{M}}})", "{{model}} {{status}}")],
            description="Keys each replica has seen at each status, summed over replicas. "
                        "Inspect them with `moat clients`.", drawStyle="line", lineInterpolation="stepAfter"), 12),
        (heatmap("Coverage distribution (percent, per request)", "moat_coverage_percent",
                 "B4B coverage of the requesting key at each request: thieves live at the top."), 8),
        (heatmap("Suspicion distribution (per request)", "moat_suspicion",
                 "Combined suspicion (max over detectors) of the requesting key: 1 = at an alert threshold."), 8),
        (ts("Coverage and suspicion p99 by model",
            [(f"histogram_quantile(0.99, sum by (model, le) (rate(moat_coverage_percent_bucket{{{M}}}[{RATE}])))",
              "coverage % {{model}}"),
             (f"histogram_quantile(0.99, sum by (model, le) (rate(moat_suspicion_bucket{{{M}}}[{RATE}]))) * 100",
              "suspicion x100 {{model}}")]), 8),
        (ts("Defense actions",
            [(f"sum by (model, defense, action) (rate(moat_defense_actions_total{{{M}}}[{RATE}]))",
              "{{model}} {{defense}} {{action}}")], unit="ops",
            description="Answers changed by a defense (action=modified) and escalations (defense=policy)."), 12),
        (ts("Watermarks in force",
            [(f"max by (model, watermark) (moat_watermark{{{M}}})", "{{model}} {{watermark}}")],
            description="The watermark each model carries (1 while in force); `moat verify --config` proves "
                        "copies of rule watermarks on fresh probes."), 12),
    ]
    health = [
        (Stat(title="Gateways up", dataSource=DS, reduceCalc="lastNotNull",
              targets=[Target(expr='sum(up{job="moat"})', refId="A")]), 4),
        (Stat(title="Version", dataSource=DS, reduceCalc="lastNotNull", textMode="name",
              targets=[Target(expr="count by (version) (moat_build_info)", legendFormat="{{version}}",
                              refId="A")]), 4),
        (ts("Model ready (upstream health)",
            [(f"min by (model) (moat_model_ready{{{M}}})", "{{model}}")],
            description="1 when the model's backend answered its last readiness check (ModelReady, ServerReady, "
                        "`moat info`).", valueMin=0, valueMax=1), 8),
        (ts("Upstream errors",
            [(f'sum by (model, code) (rate(moat_requests_total{{{M}, code=~"UNAVAILABLE|DEADLINE_EXCEEDED"}}'
              f"[{RATE}]))", "{{model}} {{code}}")], unit="reqps",
            description="Calls that failed because the model server (or the state store) was down or slow."), 8),
    ]
    return [("Traffic", traffic), ("Extraction", extraction), ("Health", health)]


def dashboard() -> Dashboard:
    panels: list[object] = []
    y = 0
    for title, row in rows():
        panels.append(RowPanel(title=title, gridPos=GridPos(h=1, w=WIDTH, x=0, y=y)))
        y += 1
        x = 0
        for panel, width in row:
            if x + width > WIDTH:
                x, y = 0, y + 8
            panel.gridPos = GridPos(h=8, w=width, x=x, y=y)
            panels.append(panel)
            x += width
        y += 8
    return Dashboard(
        title="moat: model protection", uid="moat", tags=["moat"], timezone="browser", refresh="30s",
        time=Time("now-6h", "now"), panels=panels,
        templating=Templating(list=[
            Template(name="datasource", label="Data source", type="datasource", query="prometheus"),
            Template(name="model", label="Model", dataSource=DS, query="label_values(moat_requests_total, model)",
                     includeAll=True, multi=True, allValue=".*", default="All"),
        ]),
    ).auto_panel_ids()


def render() -> str:
    return json.dumps(dashboard().to_json_data(), cls=DashboardEncoder, indent=2, sort_keys=True) + "\n"


def queries(data: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target in a dashboard JSON document."""
    found = []
    for panel in data["panels"]:
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((panel["title"], target["expr"]))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a generated file is stale")
    args = parser.parse_args(argv)
    text = render()
    stale = [path for path in OUTPUTS if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"stale: {path} (run deploy/grafana/dashboard.py)", file=sys.stderr)
        return 1 if stale else 0
    for path in OUTPUTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
