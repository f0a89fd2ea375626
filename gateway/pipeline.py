"""The data plane: everything a request goes through, independent of the transport.

The gRPC servicer decodes a message, calls :meth:`DataPlane.infer` and encodes the answer.
This issue's pipeline is auth (done by the caller), validation and the backend; detection,
defenses and watermarks slot in after the backend.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager, TypeVar

import numpy as np

from gateway.auth import Client
from gateway.backends import Backend
from gateway.config import ModelConfig
from detectors.base import QueryBatch
from gateway.errors import GatewayError, ModelNotFound, Unavailable
from gateway.metrics import GatewayMetrics
from gateway.protection import ModelProtection, Outcome
from gateway.state import StateStore
from gateway.types import InferRequest, InferResponse, ModelMetadata
from gateway.validation import validate_request

T = TypeVar("T")


@dataclass
class ServedModel:
    """A configured model and the backend that answers for it."""

    config: ModelConfig
    backend: Backend
    protection: ModelProtection | None = None


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
    ) -> None:
        self.models = models
        self._metrics = metrics
        self._clock = clock
        # One store transaction per request's protect stage where the store has them (sqlite):
        # one commit instead of one per store call (moat bench: most of the stage's cost).
        self._transaction: Callable[[], ContextManager[Any]] = getattr(store, "transaction", nullcontext)
        self.traffic: defaultdict[str, ClientTraffic] = defaultdict(ClientTraffic)
        # The state store is synchronous: detection and defenses run on these threads.
        self._protect_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="protect")

    async def start(self) -> None:
        """Start every backend, in parallel."""
        await asyncio.gather(*(model.backend.start() for model in self.models.values()))

    async def close(self) -> None:
        """Release backends; called once serving has stopped."""
        await asyncio.gather(*(model.backend.close() for model in self.models.values()))
        self._protect_pool.shutdown(wait=True)

    def model(self, name: str, version: str = "") -> ServedModel:
        """The model called ``name``; ``ModelNotFound`` lists the served ones."""
        served = self.models.get(name)
        if served is None:
            raise ModelNotFound(f"unknown model '{name}'; served: {', '.join(sorted(self.models))}")
        return served

    async def metadata(self, name: str, version: str = "") -> ModelMetadata:
        metadata = await self.model(name).backend.metadata()
        if version and metadata.versions and version not in metadata.versions:
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
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
        try:
            response = await self._infer(client, request, deadline)
        except GatewayError:
            traffic.errors += 1
            raise
        traffic.requests += 1
        return response

    async def _infer(self, client: Client, request: InferRequest, deadline: float | None) -> InferResponse:
        served = self.model(request.model_name)
        metadata = await self.metadata(request.model_name, request.model_version)
        validate_request(request, metadata, served.config.max_batch_size)
        protection = served.protection
        if protection is not None:
            started = self._clock()
            await self._in_pool(protection.admit, client)
            self._stage("admission", request.model_name, started)
        started = self._clock()
        try:
            response = await served.backend.infer(request, deadline)
        except GatewayError as error:
            if served.config.backend.name == "upstream":
                self._metrics.upstream_errors.labels(model=request.model_name, code=error.code.name).inc()
            raise
        self._metrics.backend_duration.labels(
            model=request.model_name, backend=served.config.backend.name
        ).observe(self._clock() - started)
        if protection is not None:
            await self._protect(served, client, request, response, metadata)
        response.outputs = _selected_outputs(response, metadata, request.requested_outputs)
        response.id = request.id
        response.model_version = request.model_version
        return response


    async def _protect(
        self, served: ServedModel, client: Client, request: InferRequest, response: InferResponse,
        metadata: ModelMetadata,
    ) -> None:
        """Detect and defend on the primary (first declared) input and output."""
        primary_in, primary_out = metadata.inputs[0], metadata.outputs[0]
        inputs = np.asarray(request.inputs[primary_in.name], dtype=np.float32)
        embeddings = None
        features = getattr(served.backend, "features", None)
        if served.config.kind == "classifier" and features is not None:
            embeddings = await features(inputs)
        batch = QueryBatch(model=served.config.name, kind=served.config.kind, inputs=inputs,
                           outputs=np.asarray(response.outputs[primary_out.name], dtype=np.float32),
                           embeddings=embeddings)
        outcome = await self._in_pool(self._protect_once, served.protection, client, batch)
        response.outputs[primary_out.name] = outcome.outputs.astype(primary_out.dtype, copy=False)

    def _protect_once(self, protection: ModelProtection, client: Client, batch: QueryBatch) -> Outcome:
        """The protect stage in one store transaction, committed before the answer leaves."""
        with self._transaction():
            return protection.protect(client, batch)

    async def _in_pool(self, function: Callable[..., T], *args: Any) -> T:
        """Run a state-store-bound call on the protect pool; a store outage is UNAVAILABLE."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._protect_pool, function, *args)
        except (ConnectionError, TimeoutError, OSError) as error:
            raise Unavailable("the state store is unavailable; try again") from error

    def _stage(self, stage: str, model: str, started: float) -> None:
        self._metrics.stage_duration.labels(model=model, stage=stage).observe(self._clock() - started)


def _selected_outputs(
    response: InferResponse, metadata: ModelMetadata, requested: list[str] | None
) -> dict:
    """The requested outputs (all declared ones by default), in declared order."""
    names = [spec.name for spec in metadata.outputs if requested is None or spec.name in requested]
    missing = [name for name in names if name not in response.outputs]
    if missing:
        raise GatewayError(f"the model did not produce output '{missing[0]}'")
    return {name: response.outputs[name] for name in names}
