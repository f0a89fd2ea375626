"""The data plane: everything a request goes through, independent of the transport.

The gRPC servicer decodes a message, calls :meth:`DataPlane.infer` and encodes the answer. A
request goes through validation, admission (the client's cached standing), the backend, then the
protect stage: defenses and the watermark on the client's standing, and detection of the request
itself after its answer (deferred, :mod:`gateway.deferred`) or, for batches over
``deferred_max_rows``, before it. While the backend computes a small request's answer, the loop
pools its queries for the defenses (:meth:`ModelProtection.pool_queries`).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import numpy as np

from contracts.batch import QueryBatch
from defenses.codes import PooledQueries
from gateway.auth import Client
from gateway.backends import Backend
from gateway.config import ModelConfig
from gateway.errors import GatewayError, ModelNotFound
from gateway.metrics import GatewayMetrics
from gateway.protection import ModelProtection
from gateway.sequencing import create_sequencing
from gateway.state import StateStore
from gateway.types import MAX_NAME_CHARS, InferRequest, InferResponse, ModelMetadata
from gateway.validation import validate_request

T = TypeVar("T")


@dataclass
class ServedModel:
    """A configured model and the backend that answers for it."""

    config: ModelConfig
    backend: Backend
    protection: ModelProtection | None = None


@dataclass
class _Query:
    """A protected request's primary input, float32 [B, ...], and its queries pooled for the
    defenses while the model computes the answer (None until then, or when nothing codes them)."""

    inputs: np.ndarray
    pooled: PooledQueries | None = None


@dataclass
class ClientTraffic:
    """Per-client counts since this process started (the admin service shows them)."""

    requests: int = 0
    errors: int = 0


class DataPlane:
    """Routes requests to models, validates them and records what happened."""

    def __init__(
        self, models: dict[str, ServedModel], metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic, store: StateStore | None = None,
        deferred_max_rows: int = 64, detection_commit_seconds: float = 0.0,
    ) -> None:
        self.models = models
        self._metrics = metrics
        # Each model's per-request histograms, labelled once (labels() locks and builds a key per call).
        self._backend_timers = {name: metrics.backend_duration.labels(model=name, backend=served.config.backend.name)
                                for name, served in models.items()}
        self._admission_timers = {name: metrics.stage_duration.labels(model=name, stage="admission")
                                  for name in models}
        self._clock = clock
        self.traffic: defaultdict[str, ClientTraffic] = defaultdict(ClientTraffic)
        self._in_flight = 0  # requests being answered now (on the loop: no lock)
        # Batches up to this many rows are answered first and detected after (deferred); larger
        # ones are detected before their answer, so one big batch cannot pass unjudged.
        self._deferred_max_rows = deferred_max_rows
        # The state store is synchronous; how its calls are ordered and where they run depends on
        # the store (gateway.sequencing), and is decided once, here.
        self._store_work = create_sequencing(store, commit_seconds=detection_commit_seconds)

    async def start(self) -> None:
        """Start every backend, in parallel."""
        await asyncio.gather(*(model.backend.start() for model in self.models.values()))

    async def close(self) -> None:
        """Release backends; called once serving has stopped."""
        await asyncio.gather(*(model.backend.close() for model in self.models.values()))
        await self._store_work.close()

    def model(self, name: str, version: str = "") -> ServedModel:
        """The model called ``name``; ``ModelNotFound`` lists the served ones."""
        served = self.models.get(name)
        if served is None:
            shown = f"'{name}'" if len(name) <= MAX_NAME_CHARS else f"of {len(name)} characters"
            raise ModelNotFound(f"unknown model {shown}; served: {', '.join(sorted(self.models))}")
        return served

    async def metadata(self, name: str, version: str = "") -> ModelMetadata:
        metadata = await self.model(name).backend.metadata()
        if version and metadata.versions and version not in metadata.versions:
            shown = f"'{version}'" if len(version) <= MAX_NAME_CHARS else f"of {len(version)} characters"
            raise ModelNotFound(f"model '{name}' has no version {shown}")
        return metadata

    async def model_ready(self, name: str, version: str = "") -> bool:
        ready = await self.model(name).backend.ready()
        self._metrics.model_ready.labels(model=name).set(1 if ready else 0)
        return ready

    async def server_ready(self) -> bool:
        states = await asyncio.gather(*(self.model_ready(name) for name in self.models))
        return all(states)

    async def infer(self, client: Client, request: InferRequest, deadline: float | None) -> InferResponse:
        """Answer ``request`` for ``client``; raises a ``GatewayError`` on any refusal."""
        traffic = self.traffic[client.id]
        self._in_flight += 1
        try:
            response = await self._infer(client, request, deadline)
        except GatewayError:
            traffic.errors += 1
            raise
        finally:
            self._in_flight -= 1
        traffic.requests += 1
        return response

    async def _infer(self, client: Client, request: InferRequest, deadline: float | None) -> InferResponse:
        served = self.model(request.model_name)
        metadata = await self.metadata(request.model_name, request.model_version)
        validate_request(request, metadata, served.config.max_batch_size)
        protection = served.protection
        if protection is not None:
            started = self._clock()
            snapshot = protection.cached(client.id)
            if snapshot is None and not protection.tiers[client.tier].trusted:
                snapshot = await self._store_work.look_up(client.id, lambda: protection.snapshot(client.id))
            protection.admit(client, snapshot)
            self._admission_timers[request.model_name].observe(self._clock() - started)
        query = _Query(np.asarray(request.inputs[metadata.inputs[0].name], dtype=np.float32)) \
            if protection is not None else None
        started = self._clock()
        try:
            response = await served.backend.infer(request, deadline,
                                                  while_waiting=self._while_waiting(protection, client, query))
        except GatewayError as error:
            if served.config.backend.name == "upstream":
                self._metrics.upstream_errors.labels(model=request.model_name, code=error.code).inc()
            raise
        self._backend_timers[request.model_name].observe(self._clock() - started)
        if protection is not None:
            await self._protect(served, client, cast(_Query, query), response, metadata)
        response.outputs = _selected_outputs(response, metadata, request.requested_outputs)
        response.id = request.id
        response.model_version = request.model_version
        return response

    def _while_waiting(self, protection: ModelProtection | None, client: Client,
                       query: _Query | None) -> Callable[[], None] | None:
        """What the loop may do while this request waits for its model: pool its queries for the
        defenses (:meth:`ModelProtection.pool_queries`: they depend on the queries only), and run
        the store work the sequencing has for a request that waits alone."""
        run_queued = self._store_work.while_waiting(alone=self._in_flight == 1)
        if protection is None or query is None or len(query.inputs) > self._deferred_max_rows:
            return run_queued  # big batches are defended after inline detection: nothing to pool

        def pool_then_run_queued() -> None:
            query.pooled = protection.pool_queries(client, query.inputs)
            if run_queued is not None:
                run_queued()
        return pool_then_run_queued

    async def _protect(
        self, served: ServedModel, client: Client, query: _Query, response: InferResponse,
        metadata: ModelMetadata,
    ) -> None:
        """Detect and defend on the primary (first declared) input and output."""
        protection = cast(ModelProtection, served.protection)  # the caller checked it is set
        primary_out = metadata.outputs[0]
        inputs = query.inputs
        embeddings = None
        features = getattr(served.backend, "features", None)
        if served.config.kind == "classifier" and features is not None:
            embeddings = await features(inputs)
        batch = QueryBatch(model=served.config.name, kind=served.config.kind, inputs=inputs,
                           outputs=np.asarray(response.outputs[primary_out.name], dtype=np.float32),
                           embeddings=embeddings)
        if len(inputs) <= self._deferred_max_rows:
            outputs = await self._defend_then_detect(protection, client, batch, query.pooled)
        else:
            outcome = await self._store_work.in_order(client.id, lambda: protection.protect(client, batch))
            outputs = outcome.outputs
        response.outputs[primary_out.name] = outputs.astype(primary_out.dtype, copy=False)

    async def _defend_then_detect(self, protection: ModelProtection, client: Client, batch: QueryBatch,
                                  pooled: PooledQueries | None = None) -> np.ndarray:
        """Answer with the standing the client's earlier requests left, then detect on this one
        after the answer (deferred detection, see :mod:`gateway.deferred`)."""
        await self._store_work.settled(client.id)
        snapshot = protection.cached(client.id)
        if snapshot is None:  # reset by an operator meanwhile, or a block to re-check
            snapshot = await self._store_work.look_up(client.id, lambda: protection.snapshot(client.id))
        protection.refuse_blocked(client, snapshot)
        outputs, marked = protection.defend(client, batch, snapshot, pooled)
        if marked is not None:  # the evidence is durable before the answer leaves
            await self._store_work.keep(client.id, lambda: protection.keep_evidence(client, marked))
        # Queued after the evidence: queued before, the evidence write would run it first, on
        # the answer's path.
        self._store_work.detect_after(client.id, lambda: protection.observe(client, batch),
                                      alone=self._in_flight == 1)
        return outputs

    async def settle(self) -> None:
        """Wait until the detection of every request answered so far is stored (admin reads)."""
        await self._store_work.settle()

    async def for_client(self, client: str, function: Callable[[], T]) -> T:
        """Run ``function`` after ``client``'s queued detection (admin actions on one client)."""
        return await self._store_work.for_client(client, function)


def _selected_outputs(
    response: InferResponse, metadata: ModelMetadata, requested: list[str] | None
) -> dict:
    """The requested outputs (all declared ones by default), in declared order."""
    names = [spec.name for spec in metadata.outputs if requested is None or spec.name in requested]
    missing = [name for name in names if name not in response.outputs]
    if missing:
        raise GatewayError(f"the model did not produce output '{missing[0]}'")
    return {name: response.outputs[name] for name in names}
