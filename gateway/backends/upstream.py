"""The ``upstream`` backend: forwards to any Open Inference Protocol server over gRPC.

Triton, KServe and MLServer all speak it. Metadata comes from the upstream's ModelMetadata,
fetched on first use and cached, so the gateway can start before the model server (a sidecar
rarely controls the order). The caller's deadline is propagated; the caller's credentials are not:
requests are rebuilt from decoded tensors and sent with no client metadata at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from gateway.backends.base import BACKENDS, check_params
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


def _upstream_error(error: grpc.aio.AioRpcError) -> GatewayError:
    code = error.code()
    if code in _RELAYED:
        return GatewayError(f"upstream: {error.details()}", code=code)
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
        max_message_bytes: int, credentials: grpc.ChannelCredentials | None,
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
        response = decode_response(reply)
        response.model_name = self.name
        return response

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


@BACKENDS.register("upstream")
def create_upstream(
    name: str, params: Mapping[str, Any], where: str, *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, **_: Any,
) -> UpstreamBackend:
    """Build an upstream backend: ``address`` (host:port), optional ``model``, ``timeout_seconds``, ``tls``."""
    check_params(params, where, {"address", "model", "timeout_seconds", "tls"}, {"address"})
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
    return UpstreamBackend(name, address, upstream_model, float(timeout), max_message_bytes, credentials)
