"""The ``upstream`` backend: forwards to any Open Inference Protocol server over gRPC.

Triton, KServe and MLServer all speak it. Metadata comes from the upstream's ModelMetadata,
fetched on first use and cached, so the gateway can start before the model server (a sidecar
rarely controls the order). The caller's deadline is propagated; the caller's credentials are not:
requests are rebuilt from decoded tensors and sent with no client metadata at all.

Concurrent requests can be coalesced into one upstream call (:mod:`gateway.backends.batching`):
``max_batch_rows`` > 1 (default 1: off) when the upstream declares every tensor batch-major (first
dimension -1). Requests join a batch only with others of the same inputs (names, dtypes, trailing
shapes), requested outputs, version and parameters; each gets its own rows back and its own id.
A lone request waits for nothing (``max_batch_delay_ms`` 0); under load, requests that arrive while
``max_batches_in_flight`` (default 2) calls are out go together. A model server pays most of its
per-request cost in its own Python (KServe: ~0.85 ms of CPU per one-image request, ~0.25 ms per
image in batches of 8), and a busy one is what caps a gateway's throughput.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np

from gateway.backends.base import BACKENDS, check_params
from gateway.backends.batching import DynamicBatcher, batching_params, count_param
from gateway.codec import decode_metadata, decode_response, encode_request
from gateway.config import DEFAULT_MAX_MESSAGE_BYTES, ConfigError
from gateway.errors import DeadlineExceeded, GatewayError, Unavailable
from gateway.types import InferRequest, InferResponse, ModelMetadata
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

# Upstream codes whose message is about the request itself and safe to relay to the caller.
_RELAYED = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION,
}
_METADATA_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class _BatchKey:
    """What requests must share to go upstream as one (with their inputs' trailing shapes and dtypes)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]  # the outputs answered, in order
    requested: bool  # whether the caller named them (else the upstream answers all it declares)
    version: str
    parameters: tuple[tuple[str, bool | int | float | str], ...]


def _upstream_error(error: grpc.aio.AioRpcError) -> GatewayError:
    code = error.code()
    if code in _RELAYED:
        return GatewayError(f"upstream: {error.details()}", code=code.name)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("upstream did not answer before the deadline")
    # Down, refused, crashed or internal: the caller sees one retryable status and no internals.
    return Unavailable("upstream model server is unavailable")


def _read(path: Any, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(field, f"cannot read {path!r}: {error.strerror}") from None


def _credentials(tls: Any, where: str) -> grpc.ChannelCredentials | None:
    if tls is None:
        return None
    if not isinstance(tls, Mapping) or set(tls) - {"ca_file", "cert_file", "key_file"}:
        raise ConfigError(where, "must be a mapping of ca_file, cert_file, key_file")
    ca = _read(tls["ca_file"], f"{where}.ca_file") if "ca_file" in tls else None
    cert = _read(tls["cert_file"], f"{where}.cert_file") if "cert_file" in tls else None
    key = _read(tls["key_file"], f"{where}.key_file") if "key_file" in tls else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class UpstreamBackend:
    """One model on an upstream server, reached through a shared, auto-reconnecting channel."""

    def __init__(
        self, name: str, address: str, upstream_model: str, timeout_seconds: float,
        max_message_bytes: int, credentials: grpc.ChannelCredentials | None, *,
        max_batch_rows: int = 1, max_batch_delay: float = 0.0, max_batches_in_flight: int = 2,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self._upstream_model = upstream_model
        self._timeout = timeout_seconds
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Reconnect quickly once a restarted upstream is back, instead of backing off for minutes.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GRPCInferenceServiceStub | None = None
        self._metadata: ModelMetadata | None = None
        # The declared output names when every tensor is batch-major, else None (never batched).
        self._batch_outputs: tuple[str, ...] | None = None
        self.batcher = (DynamicBatcher(self._run_batch, max_rows=max_batch_rows, max_delay=max_batch_delay,
                                       max_in_flight=max_batches_in_flight, on_batch=on_batch)
                        if max_batch_rows > 1 else None)

    async def start(self) -> None:
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
        else:
            self._channel = grpc.aio.secure_channel(self.address, self._credentials, options=self._options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    async def metadata(self) -> ModelMetadata:
        if self._metadata is None:
            try:
                reply = await self._stub.ModelMetadata(  # type: ignore[union-attr]
                    pb.ModelMetadataRequest(name=self._upstream_model), timeout=_METADATA_TIMEOUT_SECONDS
                )
            except grpc.aio.AioRpcError as error:
                raise _upstream_error(error) from None
            upstream = decode_metadata(reply)
            self._metadata = ModelMetadata(
                name=self.name, inputs=upstream.inputs, outputs=upstream.outputs,
                platform=upstream.platform, versions=upstream.versions,
            )
            if all(spec.shape[:1] == (-1,) for spec in (*upstream.inputs, *upstream.outputs)):
                self._batch_outputs = tuple(spec.name for spec in upstream.outputs)
        return self._metadata

    async def ready(self) -> bool:
        try:
            reply = await self._stub.ModelReady(  # type: ignore[union-attr]
                pb.ModelReadyRequest(name=self._upstream_model), timeout=_METADATA_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.ready)

    async def infer(self, request: InferRequest, deadline: float | None, *,
                    while_waiting: Callable[[], None] | None = None) -> InferResponse:
        key = await self._batch_key(request)
        if key is None:
            response = await self._call(request, deadline, while_waiting)
            response.model_name = self.name
            return response
        arrays = await self._batcher_wait(key, request, deadline, while_waiting)
        return InferResponse(self.name, dict(zip(key.outputs, arrays, strict=True)), request.model_version, request.id)

    async def _batch_key(self, request: InferRequest) -> _BatchKey | None:
        """The request's batch key, or None where it goes upstream alone: batching off, the upstream
        not batch-major (or its metadata unreachable: the call itself will say why), or inputs
        without one common first dimension."""
        if self.batcher is None or not request.inputs:
            return None
        if any(a.ndim == 0 for a in request.inputs.values()) or len({a.shape[0] for a in request.inputs.values()}) > 1:
            return None
        try:
            await self.metadata()
        except GatewayError:
            return None
        if self._batch_outputs is None:
            return None
        requested = request.requested_outputs
        outputs = tuple(requested) if requested else self._batch_outputs
        return _BatchKey(tuple(request.inputs), outputs, bool(requested), request.model_version,
                         tuple(sorted(request.parameters.items())))

    async def _batcher_wait(self, key: _BatchKey, request: InferRequest, deadline: float | None,
                            while_waiting: Callable[[], None] | None) -> list[np.ndarray]:
        """This request's rows of its batch's answer; its own deadline bounds its wait."""
        submitted = self.batcher.submit(key, list(request.inputs.values()), deadline,  # type: ignore[union-attr]
                                        while_waiting=while_waiting)
        if deadline is None:
            return await submitted
        try:
            return await asyncio.wait_for(submitted, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded("upstream did not answer before the deadline") from None

    async def _run_batch(self, key: Hashable, arrays: list[np.ndarray], deadline: float | None,
                         started: Callable[[], None] | None) -> list[np.ndarray]:
        """One upstream call for a batch: inputs each [B, ...] -> the key's outputs, each [B, ...]."""
        key = cast(_BatchKey, key)  # only this backend submits to its batcher
        request = InferRequest(self.name, dict(zip(key.inputs, arrays, strict=True)), key.version,
                               requested_outputs=list(key.outputs) if key.requested else None,
                               parameters=dict(key.parameters))
        response = await self._call(request, deadline, started)
        rows = len(arrays[0])
        answered = []
        for name in key.outputs:
            value = response.outputs.get(name)
            if value is None or value.ndim == 0 or value.shape[0] != rows:
                shape = None if value is None else list(value.shape)
                raise GatewayError(f"upstream answered output {name!r} with shape {shape} for a batch of {rows} "
                                   "rows: it does not batch as its metadata declares; set max_batch_rows: 1")
            answered.append(value)
        return answered

    async def _call(self, request: InferRequest, deadline: float | None,
                    while_waiting: Callable[[], None] | None) -> InferResponse:
        timeout = self._timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise DeadlineExceeded("deadline expired before the upstream call")
        message = encode_request(request)
        message.model_name = self._upstream_model
        try:
            call = self._stub.ModelInfer(message, timeout=timeout)  # type: ignore[union-attr]
            if while_waiting is not None:
                # grpc.aio sends from a task of the call's own, scheduled as the call is made: one
                # turn of the loop lets it go out before the loop is lent to while_waiting.
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:  # the client went away: so does the upstream call
                    call.cancel()
                    raise
                while_waiting()
            reply = await call
        except grpc.aio.AioRpcError as error:
            raise _upstream_error(error) from None
        return decode_response(reply)

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        if self._channel is not None:
            await self._channel.close()


@BACKENDS.register("upstream")
def create_upstream(
    name: str, params: Mapping[str, Any], where: str, *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, on_batch: Callable[[int], None] | None = None, **_: Any,
) -> UpstreamBackend:
    """Build an upstream backend: ``address`` (host:port), optional ``model``, ``timeout_seconds``, ``tls``,
    and the batching of concurrent requests (see the module docstring)."""
    check_params(params, where, {"address", "model", "timeout_seconds", "tls", "max_batch_rows",
                                 "max_batch_delay_ms", "max_batches_in_flight"}, {"address"})
    address = params["address"]
    if not isinstance(address, str) or ":" not in address:
        raise ConfigError(f"{where}.address", f"must be host:port, got {address!r}")
    upstream_model = params.get("model", name)
    if not isinstance(upstream_model, str) or not upstream_model:
        raise ConfigError(f"{where}.model", "must be a non-empty string")
    timeout = params.get("timeout_seconds", 30.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"{where}.timeout_seconds", f"must be a positive number, got {timeout!r}")
    credentials = _credentials(params.get("tls"), f"{where}.tls")
    rows, delay = batching_params(params, where, default_rows=1)
    in_flight = count_param(params, where, "max_batches_in_flight", 2)
    return UpstreamBackend(name, address, upstream_model, float(timeout), max_message_bytes, credentials,
                           max_batch_rows=rows, max_batch_delay=delay, max_batches_in_flight=in_flight,
                           on_batch=on_batch)
