"""The protect stage of one model: admission, detection, the policy, and defenses.

Detection (:meth:`ModelProtection.observe`) touches the state store; the data plane runs it after
the answer, on the event loop for local stores and on the detection worker's threads for redis
(:mod:`gateway.deferred`). Per client, detection and the policy run under a lock and in order, so
concurrent requests of one client update its state one after the other in this replica; across
replicas each store operation is atomic on its own. Defenses (:meth:`ModelProtection.defend`) are
pure numpy on the client's last standing (:class:`Snapshot`).

The policy reads the detectors' combined suspicion (the max of their scores, in [0, 1]) against
the model's thresholds: ``flag_at`` flags the client (defenses that act on flagged clients
start), ``throttle_at`` rate-limits it (RESOURCE_EXHAUSTED with a retry hint), ``block_at`` blocks
it (PERMISSION_DENIED until an operator unblocks or resets it).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from contracts.batch import QueryBatch, Verdict
from contracts.state import client_key, client_prefix, evidence_stream
from defenses.base import DefenseContext
from defenses.codes import PooledQueries
from defenses.watermark import Marked, Watermark
from gateway.alerts import AlertSink
from gateway.auth import Client
from gateway.config import ModelConfig, PolicyConfig, TierConfig
from gateway.errors import PermissionDenied, ResourceExhausted
from gateway.metrics import GatewayMetrics
from gateway.state import StateStore
from gateway.tiers import TierComponents, build_tier

STATUSES = ("ok", "flagged", "throttled", "blocked")
RECHECK_SECONDS = 1.0  # a cached block or throttle is re-read from the store after this long
MAX_SNAPSHOTS = 100_000  # clients whose standing a model keeps in memory (~100 MB)
# Locks that serialise one client's detection, a client mapped to one by its name's hash: a lock
# per client ever seen grew without bound (100,000 clients, 100,000 locks kept forever). Two
# clients sharing one only wait for each other, and detection runs on a few threads at most.
CLIENT_LOCKS = 256
log = logging.getLogger("moat.watermark")


@dataclass(frozen=True)
class Snapshot:
    """A client's standing after its latest observed request: what its next answer is based on.

    ``taken`` is the protection's clock when it was computed or read."""

    status: str
    suspicion: float
    verdicts: Mapping[str, Verdict]
    taken: float


@dataclass(frozen=True)
class Outcome:
    """What the protect stage decided for one batch; ``outputs`` is what the client receives."""

    outputs: np.ndarray
    verdicts: Mapping[str, Verdict]
    suspicion: float
    status: str


class TokenBucket:
    """``rate`` requests per second with a burst of one second's worth (per replica)."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self.rate, self._clock = rate, clock
        self._tokens, self._updated = rate, clock()

    def take(self) -> float:
        """0 if a request may pass now, else the seconds until one may."""
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


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
        self._buckets: dict[str, TokenBucket] = {}
        self._statuses: dict[str, str] = {}
        self._status_counts = {s: 0 for s in STATUSES[1:]}  # clients per non-ok status, for the gauge
        # This process's view of each client's standing, least recently updated first (~1 KB each).
        self._snapshots: OrderedDict[str, Snapshot] = OrderedDict()
        self._children = _MetricChildren(metrics, config)
        if config.watermark is not None:
            metrics.watermark.labels(model=config.name, watermark=config.watermark.name).set(1)
        # Per tier: the grey levels at which its defenses and watermark code every answer's queries,
        # or None when none codes queries at all (see pool_queries).
        self._query_levels = {name: _query_levels((*t.defenses, t.watermark)) for name, t in self.tiers.items()}

    def _status_key(self, client: str) -> str:
        return client_key("client", self.config.name, client)

    def cached(self, client: str) -> Snapshot | None:
        """``client``'s standing as this process last saw it, or None when it must be read from
        the store: never seen, or blocked/throttled longer than ``RECHECK_SECONDS`` ago (another
        replica's operator may have lifted it)."""
        snapshot = self._snapshots.get(client)
        if snapshot is not None and snapshot.status in ("blocked", "throttled") \
                and self._clock() - snapshot.taken > RECHECK_SECONDS:
            return None
        return snapshot

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
        suspicion = max((v.score for v in verdicts.values()), default=0.0)
        snapshot = Snapshot(status=status, suspicion=suspicion, verdicts=dict(verdicts), taken=self._clock())
        with self._guard:
            self._snapshots[client] = snapshot
            self._snapshots.move_to_end(client)
            if len(self._snapshots) > MAX_SNAPSHOTS:  # an evicted client is read from the store again
                self._snapshots.popitem(last=False)
        return snapshot

    def admit(self, caller: Client, snapshot: Snapshot | None) -> None:
        """Refuse a blocked client, and a throttled one over its rate; trusted tiers always pass.
        ``snapshot`` is the client's standing (see :meth:`snapshot`)."""
        components, client = self.tiers[caller.tier], caller.id
        if components.trusted or snapshot is None:
            return
        self.refuse_blocked(caller, snapshot)
        if snapshot.status == "throttled":
            with self._guard:
                bucket = self._buckets.setdefault(
                    client, TokenBucket(components.policy.throttle_per_second, self._clock))
                wait = bucket.take()
            if wait > 0:
                raise ResourceExhausted(
                    f"rate limited: retry after {wait:.2f} s",
                    trailers=(("retry-after-ms", str(int(wait * 1000) + 1)),),
                )

    def refuse_blocked(self, caller: Client, snapshot: Snapshot) -> None:
        """PERMISSION_DENIED for a blocked client (trusted tiers are never blocked)."""
        if snapshot.status == "blocked" and not self.tiers[caller.tier].trusted:
            raise PermissionDenied("this API key is blocked for this model; contact the API owner")

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
        if watermark is None:
            return
        model, client = self.config.name, caller.id
        stream = evidence_stream(model, client)
        for record in marked.records:
            record_id = self._store.append_record(stream, record, max_records=watermark.max_evidence)
            if record_id == watermark.max_evidence + 1:  # once per client: the first record past the bound
                log.warning(json.dumps({"event": "evidence_bound_reached", "client": client, "model": model,
                                        "max_evidence": watermark.max_evidence}))
                self._metrics.evidence_bound_reached.labels(model=model).inc()
        self._metrics.watermarked_answers.labels(model=model).inc(len(marked.records))
        self._metrics.evidence_records.labels(model=model).inc(len(marked.records))

    def evidence(self, client: str, after_id: int = 0, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        """``client``'s evidence records on this model with id > ``after_id``, oldest first."""
        return self._store.read_records(evidence_stream(self.config.name, client), after_id, limit)

    def import_evidence(self, client: str, records: list[dict[str, Any]]) -> int:
        """Append imported evidence records for ``client``; returns how many were stored."""
        watermark = next((t.watermark for t in self.tiers.values() if t.watermark is not None), None)
        bound = watermark.max_evidence if watermark is not None else None
        stream = evidence_stream(self.config.name, client)
        for record in records:
            # The file's ids were the exporting store's; this store numbers the records anew.
            self._store.append_record(stream, {k: v for k, v in record.items() if k != "id"}, max_records=bound)
        return len(records)

    def _decide(self, previous: Mapping[str, float | str], suspicion: float,
                verdicts: Mapping[str, Verdict], policy: PolicyConfig) -> str:
        """The new status: what the suspicion calls for, but never below the previous status.

        Statuses only rise: a thief that mixes natural queries into its stream must not wash its
        flag out. An operator lowers them (unblock, reset); an unblocked client is exempt from
        throttling and blocking until it is reset.
        """
        escalate = previous.get("exempt") != 1.0
        wanted = "ok"
        if suspicion >= policy.flag_at or any(v.alert for v in verdicts.values()):
            wanted = "flagged"
        if escalate and policy.throttle_at is not None and suspicion >= policy.throttle_at:
            wanted = "throttled"
        if escalate and policy.block_at is not None and suspicion >= policy.block_at:
            wanted = "blocked"
        before = str(previous.get("status", "ok"))
        return max(wanted, before, key=STATUSES.index)

    def _record(self, client: str, batch: QueryBatch, verdicts: Mapping[str, Verdict], suspicion: float,
                policy: PolicyConfig) -> tuple[str, str]:
        """Store the new status and figures and raise alerts; returns (status before, status)."""
        key = self._status_key(client)
        previous = self._store.get_fields(key)
        status = self._decide(previous, suspicion, verdicts, policy)
        fields: dict[str, float | str] = {"status": status, "suspicion": suspicion, "updated": time.time()}
        for name, verdict in verdicts.items():
            fields[f"alert:{name}"] = 1.0 if verdict.alert else 0.0
            fields.update({f"{name}.{figure}": value for figure, value in verdict.figures.items()})
        self._store.update_fields(key, fields, {"queries": len(batch.outputs)})  # one round trip
        self._raise_alerts(client, previous, status, verdicts)
        return str(previous.get("status", "ok")), status

    def _raise_alerts(self, client: str, previous: Mapping[str, float | str], status: str,
                      verdicts: Mapping[str, Verdict]) -> None:
        """One alert per detector whose alert flag turned on, and one per rise in status (flagged,
        throttled, blocked) that no such alert already announced, naming the top-scoring detector."""
        raised = [(name, verdict) for name, verdict in verdicts.items()
                  if verdict.alert and previous.get(f"alert:{name}") != 1.0]
        rose = STATUSES.index(status) > STATUSES.index(str(previous.get("status", "ok")))
        if rose and not raised and verdicts:
            top = max(verdicts.values(), key=lambda v: v.score)
            raised.append((top.detector, top))
        for name, verdict in raised:
            self._alerts.raise_alert(client=client, model=self.config.name, detector=name,
                                     figures=verdict.figures, action=status)
            self._metrics.alerts.labels(model=self.config.name, detector=name).inc()

    def _account(self, client: str, before: str, status: str, verdicts: Mapping[str, Verdict],
                 suspicion: float) -> None:
        model = self.config.name
        if status != before and status in ("throttled", "blocked"):
            action = {"throttled": "throttle", "blocked": "block"}[status]
            self._metrics.defense_actions.labels(model=model, defense="policy", action=action).inc()
        with self._guard:
            # Counted as statuses change, not by a scan of every client (moat bench: a scan made each
            # request cost 7x more with 100,000 clients than with 10).
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
        with self._guard:
            self._buckets.pop(client, None)
            self._snapshots.pop(client, None)  # read anew from the store on the next request
        return True

    def reset(self, client: str) -> int:
        """Forget everything about ``client`` on this model; returns the number of keys deleted."""
        with self._guard:
            self._buckets.pop(client, None)
            self._snapshots.pop(client, None)
            self._count_status(self._statuses.pop(client, None), None)
        return self._store.delete(client_prefix(self.config.name, client))


def _query_levels(components: tuple[Any, ...]) -> tuple[int, ...] | None:
    """The grey levels at which ``components`` (defenses, watermark or None) code every answer's
    queries (their ``query_levels``), or None when none of them codes queries."""
    coding = [c.query_levels for c in components if hasattr(c, "query_levels")]
    return None if not coding else tuple(sorted({n for levels in coding for n in levels}))
