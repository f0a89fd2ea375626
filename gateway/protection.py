"""The protect stage of one model: detection, the policy, defenses and the watermark, per tier.

:class:`ModelProtection` orchestrates the parts: admission (:mod:`gateway.admission`), the
policy (:mod:`gateway.policy`), the defenses and watermark (built per tier by
:mod:`gateway.tiers`) and the evidence they leave (:mod:`gateway.evidence_log`). Detection
(:meth:`ModelProtection.observe`) touches the state store; the data plane decides when and where it
runs (:mod:`gateway.sequencing`). Per client, detection and the policy run under a lock and in
order, so concurrent requests of one client update its state one after the other in this replica;
across replicas each store operation is atomic on its own. Defenses
(:meth:`ModelProtection.defend`) are pure numpy on the client's last standing (:class:`Snapshot`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from contracts.batch import QueryBatch, Verdict
from contracts.state import client_key, client_prefix
from defenses.base import DefenseContext
from defenses.codes import PooledQueries
from defenses.watermark import Marked, Watermark
from gateway.admission import Admission, Snapshot, Standings, refuse_blocked
from gateway.alerts import AlertSink
from gateway.auth import Client
from gateway.config import ModelConfig, PolicyConfig, TierConfig
from gateway.evidence_log import EvidenceLog
from gateway.metrics import GatewayMetrics
from gateway.policy import STATUSES, alerts_to_raise, decide, status_fields
from gateway.state import StateStore
from gateway.tiers import TierComponents, build_tier

__all__ = ["CLIENT_LOCKS", "ModelProtection", "Outcome", "Snapshot"]

# Locks that serialise one client's detection, a client mapped to one by its name's hash: a lock
# per client ever seen grew without bound (100,000 clients, 100,000 locks kept forever). Two
# clients sharing one only wait for each other, and detection runs on a few threads at most.
CLIENT_LOCKS = 256


@dataclass(frozen=True)
class Outcome:
    """What the protect stage decided for one batch; ``outputs`` is what the client receives."""

    outputs: np.ndarray
    verdicts: Mapping[str, Verdict]
    suspicion: float
    status: str


class _MetricChildren:
    """One model's labelled metric series, looked up once: ``labels()`` costs a lock and a dict
    lookup per call, a dozen times per request on the detection worker."""

    def __init__(self, metrics: GatewayMetrics, config: ModelConfig) -> None:
        model = config.name
        self.flagged = {s: metrics.flagged_clients.labels(model=model, status=s) for s in STATUSES[1:]}
        self.suspicion = metrics.suspicion.labels(model=model)
        self.coverage = metrics.coverage.labels(model=model)
        self.stages = {s: metrics.stage_duration.labels(model=model, stage=s) for s in ("detect", "defend", "watermark")}
        self.modified = {c.name: metrics.defense_actions.labels(model=model, defense=c.name, action="modified")
                         for c in config.defenses}


class ModelProtection:
    """Detectors, policy and defenses of one model, per tier, with state in ``store``."""

    def __init__(
        self, config: ModelConfig, where: str, tiers: tuple[TierConfig, ...], store: StateStore, secret: bytes,
        metrics: GatewayMetrics, alerts: AlertSink, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config, self._store, self._metrics, self._alerts, self._clock = config, store, metrics, alerts, clock
        self.tiers = {tier.name: build_tier(config, tier, where, store, secret) for tier in tiers}
        self._guard = threading.Lock()
        self._locks = tuple(threading.Lock() for _ in range(CLIENT_LOCKS))
        self._statuses: dict[str, str] = {}
        self._status_counts = {s: 0 for s in STATUSES[1:]}  # clients per non-ok status, for the gauge
        self._standings = Standings(clock)  # this process's view of each client's standing
        self._admission = Admission(clock)
        self._evidence = EvidenceLog(config.name, store, metrics)
        self._children = _MetricChildren(metrics, config)
        if config.watermark is not None:
            metrics.watermark.labels(model=config.name, watermark=config.watermark.name).set(1)
        # Per tier: the grey levels at which its defenses and watermark code every answer's queries,
        # or None when none codes queries at all (see pool_queries).
        self._query_levels = {name: _query_levels((*t.defenses, t.watermark)) for name, t in self.tiers.items()}

    def _status_key(self, client: str) -> str:
        return client_key("client", self.config.name, client)

    def cached(self, client: str) -> Snapshot | None:
        """``client``'s standing as this process last saw it, or None when it must be read from the
        store (see :meth:`Standings.cached`)."""
        return self._standings.cached(client)

    def snapshot(self, client: str) -> Snapshot:
        """``client``'s standing: cached, or read from the store (status and detector peeks)."""
        snapshot = self.cached(client)
        if snapshot is not None:
            return snapshot
        components = self._untrusted_components()
        verdicts = {name: detector.peek(client, self.config.name)
                    for name, detector in (components.detectors.items() if components else ())}
        status = str(self._store.get_fields(self._status_key(client)).get("status", "ok"))
        return self._remember(client, status, verdicts)

    def _untrusted_components(self) -> TierComponents | None:
        return next((t for t in self.tiers.values() if not t.trusted), None)

    def _remember(self, client: str, status: str, verdicts: Mapping[str, Verdict]) -> Snapshot:
        return self._standings.remember(client, status, verdicts)

    def admit(self, caller: Client, snapshot: Snapshot | None) -> None:
        """Refuse a blocked client, and a throttled one over its rate; trusted tiers always pass.
        ``snapshot`` is the client's standing (see :meth:`snapshot`)."""
        components = self.tiers[caller.tier]
        if not components.trusted and snapshot is not None:
            self._admission.admit(caller.id, snapshot, components.policy.throttle_per_second)

    def refuse_blocked(self, caller: Client, snapshot: Snapshot) -> None:
        """PERMISSION_DENIED for a blocked client (trusted tiers are never blocked)."""
        if not self.tiers[caller.tier].trusted:
            refuse_blocked(snapshot)

    def protect(self, caller: Client, batch: QueryBatch) -> Outcome:
        """Observe ``batch``, then answer it with the defenses its own verdicts call for (inline
        detection: the gateway's path for large batches, and for offline use)."""
        if self.tiers[caller.tier].trusted:
            return Outcome(outputs=batch.outputs, verdicts={}, suspicion=0.0, status="trusted")
        snapshot = self.observe(caller, batch)
        outputs, marked = self.defend(caller, batch, snapshot)
        if marked is not None:
            self.keep_evidence(caller, marked)
        return Outcome(outputs=outputs, verdicts=snapshot.verdicts, suspicion=snapshot.suspicion,
                       status=snapshot.status)

    def observe(self, caller: Client, batch: QueryBatch) -> Snapshot:
        """Run the detectors on ``batch``, apply the policy, store the client's new standing and
        remember it (the store side under the client's lock, metrics after it)."""
        components, client = self.tiers[caller.tier], caller.id
        if components.trusted:
            return Snapshot(status="trusted", suspicion=0.0, verdicts={}, taken=self._clock())
        with self._locks[hash(client) % len(self._locks)]:
            started = self._clock()
            verdicts = {name: detector.observe(client, batch) for name, detector in components.detectors.items()}
            suspicion = max((v.score for v in verdicts.values()), default=0.0)
            before, status = self._record(client, batch, verdicts, suspicion, components.policy)
            self._observe_stage("detect", started)
        self._account(client, before, status, verdicts, suspicion)
        return self._remember(client, status, verdicts)

    def pool_queries(self, caller: Client, inputs: np.ndarray) -> PooledQueries | None:
        """The queries ``inputs`` [B, ...] pooled, and coded at the levels ``caller``'s defenses and
        watermark code every answer at, for :meth:`defend`'s ``pooled``; None when none of them codes
        queries, or when ``inputs`` are not images (defend then reports that itself). Depends on
        the queries only, so the gateway pools them while the model computes the answer: on the
        answer's path, with caches cold after the client and the model server had the CPU, the
        same work took several times as long (``moat bench``, see the performance log)."""
        levels = self._query_levels.get(caller.tier)
        if levels is None:
            return None
        try:
            return PooledQueries.of(inputs, levels)
        except ValueError:
            return None

    def defend(self, caller: Client, batch: QueryBatch, snapshot: Snapshot,
               pooled: PooledQueries | None = None) -> tuple[np.ndarray, Marked | None]:
        """The answer to send for ``batch`` (float32 [B, K]) given the client's standing, and the
        watermark's evidence to keep before it leaves (None when nothing was marked). Pure numpy:
        no store access, so the gateway runs it on the event loop. ``pooled``: the batch's
        queries pooled beforehand (:meth:`pool_queries`), or None."""
        components = self.tiers[caller.tier]
        if components.trusted:
            return batch.outputs, None
        context = DefenseContext(client=caller.id, batch=batch, verdicts=snapshot.verdicts,
                                 suspicion=snapshot.suspicion, flagged=snapshot.status != "ok", pooled=pooled)
        watermark = components.watermark
        # A rule watermark marks the model's own answer, the same for every key, and the per-key
        # defenses act on top; an evidence watermark marks the answer the key is sent.
        first = watermark is not None and getattr(watermark, "before_defenses", False)
        marked = self._mark(watermark, batch.outputs, context) if first else None
        started = self._clock()
        outputs = marked.outputs if marked is not None else batch.outputs
        for defense in components.defenses:
            changed = defense.apply(outputs, context)
            if changed is not outputs and not np.array_equal(changed, outputs):
                self._children.modified[defense.name].inc()
            outputs = changed
        self._observe_stage("defend", started)
        if watermark is None or first:
            return outputs, (marked if marked is not None and marked.records else None)
        marked = self._mark(watermark, outputs, context)
        return marked.outputs, (marked if marked.records else None)

    def _mark(self, watermark: Watermark, outputs: np.ndarray, context: DefenseContext) -> Marked:
        started = self._clock()
        marked = watermark.mark(outputs, context)
        self._observe_stage("watermark", started)
        return marked

    def keep_evidence(self, caller: Client, marked: Marked) -> None:
        """Write the watermark's evidence records; durable when this returns, so before the answer
        leaves (a crash after this loses no evidence of a sent answer)."""
        watermark = self.tiers[caller.tier].watermark
        if watermark is not None:
            self._evidence.keep(caller.id, watermark, marked)

    def evidence(self, client: str, after_id: int = 0, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        """``client``'s evidence records on this model with id > ``after_id``, oldest first."""
        return self._evidence.read(client, after_id, limit)

    def import_evidence(self, client: str, records: list[dict[str, Any]]) -> int:
        """Append imported evidence records for ``client``; returns how many were stored."""
        watermark = next((t.watermark for t in self.tiers.values() if t.watermark is not None), None)
        return self._evidence.import_records(client, records, watermark.max_evidence if watermark else None)

    def _record(self, client: str, batch: QueryBatch, verdicts: Mapping[str, Verdict], suspicion: float,
                policy: PolicyConfig) -> tuple[str, str]:
        """Store the new status and figures and raise alerts; returns (status before, status)."""
        key = self._status_key(client)
        previous = self._store.get_fields(key)
        status = decide(previous, suspicion, verdicts, policy)
        fields = status_fields(status, suspicion, verdicts, time.time())
        self._store.update_fields(key, fields, {"queries": len(batch.outputs)})  # one round trip
        for name, verdict in alerts_to_raise(previous, status, verdicts):
            self._alerts.raise_alert(client=client, model=self.config.name, detector=name,
                                     figures=verdict.figures, action=status)
            self._metrics.alerts.labels(model=self.config.name, detector=name).inc()
        return str(previous.get("status", "ok")), status

    def _account(self, client: str, before: str, status: str, verdicts: Mapping[str, Verdict],
                 suspicion: float) -> None:
        model = self.config.name
        if status != before and status in ("throttled", "blocked"):
            action = {"throttled": "throttle", "blocked": "block"}[status]
            self._metrics.defense_actions.labels(model=model, defense="policy", action=action).inc()
        with self._guard:
            # Counted as statuses change, not by a scan of every client: a request's cost must not
            # grow with the number of clients.
            self._count_status(self._statuses.get(client), status)
            self._statuses[client] = status
            counts = dict(self._status_counts)
        for name, count in counts.items():
            self._children.flagged[name].set(count)
        self._children.suspicion.observe(suspicion)
        if "coverage" in verdicts and "coverage" in verdicts["coverage"].figures:
            self._children.coverage.observe(verdicts["coverage"].figures["coverage"])

    def _count_status(self, old: str | None, new: str | None) -> None:
        """Move one client between status counts (call under ``self._guard``)."""
        if old in self._status_counts:
            self._status_counts[old] -= 1  # type: ignore[index]
        if new in self._status_counts:
            self._status_counts[new] += 1  # type: ignore[index]

    def _observe_stage(self, stage: str, started: float) -> None:
        self._children.stages[stage].observe(self._clock() - started)

    def client_state(self, client: str) -> dict[str, float | str]:
        """What the store holds about ``client`` on this model (status, queries, figures)."""
        return self._store.get_fields(self._status_key(client))

    def unblock(self, client: str) -> bool:
        """Lift a block or throttle and exempt the client from escalation until a reset (defenses for
        flagged clients still apply); True if it was blocked or throttled."""
        key = self._status_key(client)
        if self._store.get_fields(key).get("status") not in ("blocked", "throttled"):
            return False
        self._store.set_fields(key, {"status": "flagged", "exempt": 1.0})
        self._admission.forget(client)
        self._standings.forget(client)  # read anew from the store on the next request
        return True

    def reset(self, client: str) -> int:
        """Forget everything about ``client`` on this model; returns the number of keys deleted."""
        self._admission.forget(client)
        self._standings.forget(client)
        with self._guard:
            self._count_status(self._statuses.pop(client, None), None)
        return self._store.delete(client_prefix(self.config.name, client))


def _query_levels(components: tuple[Any, ...]) -> tuple[int, ...] | None:
    """The grey levels at which ``components`` (defenses, watermark or None) code every answer's
    queries (their ``query_levels``), or None when none of them codes queries."""
    coding = [c.query_levels for c in components if hasattr(c, "query_levels")]
    return None if not coding else tuple(sorted({n for levels in coding for n in levels}))
