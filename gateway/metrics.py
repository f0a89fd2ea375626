"""Prometheus metrics of the gateway, on an injected registry.

Names follow Prometheus conventions: the ``moat_`` prefix, base units, ``_total`` on counters.
Labels are bounded: ``model`` takes only configured model names (anything else is
``_unknown``, so a caller cannot blow up cardinality), ``code`` the gRPC status names.
No metric carries a per-client label.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from gateway import __version__

# `_created` series double the exposition size and no dashboard of ours reads them.
disable_created_metrics()

UNKNOWN_MODEL = "_unknown"
# Sub-millisecond resolution for a proxy hop, up to a slow upstream.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = tuple(float(2**power) for power in range(11))  # 1 .. 1024 rows
SIZE_BUCKETS = tuple(float(2**power) for power in range(6, 28, 2))  # 64 B .. 64 MiB


@dataclass(frozen=True)
class RequestInstruments:
    """One model's per-request series, labelled once: ``labels()`` takes a lock and builds a key
    on every call, and a request records four of them."""

    duration: Any
    request_size: Any
    response_size: Any
    ok: Any


class GatewayMetrics:
    """The gateway's metrics, registered on ``registry`` (a fresh one per gateway in tests)."""

    def __init__(self, registry: CollectorRegistry, models: Iterable[str]) -> None:
        self.registry = registry
        self._models = frozenset(models)
        self.requests = Counter(
            "moat_requests", "Inference requests by model and gRPC status code.",
            ["model", "code"], registry=registry,
        )
        self.request_duration = Histogram(
            "moat_request_duration_seconds", "End-to-end ModelInfer latency inside the gateway.",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.backend_duration = Histogram(
            "moat_backend_duration_seconds",
            "Time the backend (embedded model or upstream server) took to answer.",
            ["model", "backend"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.backend_batch_rows = Histogram(
            "moat_backend_batch_rows",
            "Rows per batch the backend ran: one embedded forward pass, or one upstream call of batched requests.",
            ["model", "backend"], buckets=BATCH_BUCKETS, registry=registry,
        )
        self.request_size = Histogram(
            "moat_request_size_bytes", "Serialized ModelInfer request size.",
            ["model"], buckets=SIZE_BUCKETS, registry=registry,
        )
        self.response_size = Histogram(
            "moat_response_size_bytes", "Serialized ModelInfer response size.",
            ["model"], buckets=SIZE_BUCKETS, registry=registry,
        )
        self.upstream_errors = Counter(
            "moat_upstream_errors", "Failed calls to an upstream server by model and status code.",
            ["model", "code"], registry=registry,
        )
        self.inflight = Gauge(
            "moat_inflight_requests", "ModelInfer requests being handled now.", registry=registry,
        )
        self.model_ready = Gauge(
            "moat_model_ready", "1 when the model answered its last readiness check.", ["model"],
            registry=registry,
        )
        self._protection_metrics(registry)
        self._instruments: dict[str, RequestInstruments] = {}
        build = Gauge("moat_build_info", "Gateway version.", ["version"], registry=registry)
        build.labels(version=__version__).set(1)

    def _protection_metrics(self, registry: CollectorRegistry) -> None:
        self.alerts = Counter(
            "moat_alerts", "Extraction alerts raised, by model and detector.", ["model", "detector"],
            registry=registry,
        )
        self.flagged_clients = Gauge(
            "moat_flagged_clients", "Clients this replica currently considers flagged, by model and status.",
            ["model", "status"], registry=registry,
        )
        self.defense_actions = Counter(
            "moat_defense_actions", "Answers changed by a defense, and escalations (defense=policy).",
            ["model", "defense", "action"], registry=registry,
        )
        self.stage_duration = Histogram(
            "moat_stage_duration_seconds", "Time spent per pipeline stage.", ["model", "stage"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.coverage = Histogram(
            "moat_coverage_percent", "B4B coverage of the requesting client, observed per request.",
            ["model"], buckets=(1, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100), registry=registry,
        )
        # Which watermark each model carries: set once at start, so nothing here moves with one
        # request's mark (a rule watermark is a function of the query; it is never counted per answer).
        self.watermark = Gauge(
            "moat_watermark", "1 per model for the watermark in force, by name.", ["model", "watermark"],
            registry=registry,
        )
        self.watermarked_answers = Counter(
            "moat_watermarked_answers", "Answers whose evidence an evidence watermark (dawn, direction) recorded.",
            ["model"], registry=registry,
        )
        self.evidence_records = Counter(
            "moat_evidence_records", "Watermark evidence records written to the state store.", ["model"],
            registry=registry,
        )
        self.evidence_bound_reached = Counter(
            "moat_evidence_bound_reached",
            "Clients whose evidence reached max_evidence (older records are dropped from then on).", ["model"],
            registry=registry,
        )
        self.suspicion = Histogram(
            "moat_suspicion", "Combined suspicion of the requesting client, observed per request.",
            ["model"], buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0), registry=registry,
        )

    def model_label(self, name: str) -> str:
        """``name`` if it is a configured model, else the bounded placeholder."""
        return name if name in self._models else UNKNOWN_MODEL

    def for_model(self, label: str) -> RequestInstruments:
        """The per-request series of ``label`` (a :meth:`model_label`)."""
        instruments = self._instruments.get(label)
        if instruments is None:  # a race builds the same children twice: labels() returns one child
            instruments = self._instruments[label] = RequestInstruments(
                duration=self.request_duration.labels(model=label),
                request_size=self.request_size.labels(model=label),
                response_size=self.response_size.labels(model=label),
                ok=self.requests.labels(model=label, code="OK"),
            )
        return instruments


class MetricsServer:
    """The Prometheus text endpoint on its own HTTP port (``/metrics``)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
