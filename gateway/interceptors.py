"""The one place where errors become gRPC statuses, and where every ModelInfer is counted.

A :class:`~gateway.errors.GatewayError` keeps its code and reason; any other exception is
logged here and becomes INTERNAL with a generic message, so internals never reach a caller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics

log = logging.getLogger("moat.gateway")
_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions of unary and streaming handlers to statuses and records ModelInfer metrics."""

    def __init__(self, metrics: GatewayMetrics | None = None) -> None:
        self._metrics = metrics
        # method -> (the service's handler, its wrapped handler): wrapped once, not on every call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._guarded_stream(handler.unary_stream), **codec)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._guarded(handler.stream_unary), **codec)
        if handler.unary_unary is None:
            return handler
        behavior = self._guarded(handler.unary_unary)
        if self._metrics is not None and method == _INFER_METHOD:
            behavior = self._measured(behavior, self._metrics)
        return grpc.unary_unary_rpc_method_handler(behavior, **codec)

    @staticmethod
    def _guarded(behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Callable:
        """A handler returning one response (its request may be a stream)."""
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001 - mapped in _abort
                await _abort(context, behavior, error)

        return guarded

    @staticmethod
    def _guarded_stream(behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]) -> Callable:
        """A handler streaming its responses: errors raised before or between them are mapped too."""
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001 - mapped in _abort
                await _abort(context, behavior, error)

        return guarded

    @staticmethod
    def _measured(behavior: Callable, metrics: GatewayMetrics) -> Callable:
        async def measured(request: Any, context: grpc.aio.ServicerContext) -> Any:
            model = metrics.model_label(request.model_name)
            instruments = metrics.for_model(model)
            started = time.perf_counter()
            metrics.inflight.inc()
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await behavior(request, context)
                code = grpc.StatusCode.OK
                instruments.response_size.observe(response.ByteSize())
                return response
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                metrics.inflight.dec()
                if code == grpc.StatusCode.OK:
                    instruments.ok.inc()
                else:
                    metrics.requests.labels(model=model, code=_code_name(code)).inc()
                instruments.duration.observe(time.perf_counter() - started)
                instruments.request_size.observe(request.ByteSize())

        return measured


async def _abort(context: grpc.aio.ServicerContext, behavior: Callable, error: Exception) -> None:
    """End the call with ``error``'s status; anything but a GatewayError is logged and becomes a
    generic INTERNAL, so internals never reach a caller."""
    if not isinstance(error, GatewayError):
        log.exception("unhandled error in %s", getattr(behavior, "__name__", "handler"), exc_info=error)
        error = GatewayError("internal error")
    if error.trailers:
        context.set_trailing_metadata(error.trailers)
    await context.abort(grpc.StatusCode[error.code], error.reason)


def _code_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    # context.code() may hand back the raw integer on some grpc versions.
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
