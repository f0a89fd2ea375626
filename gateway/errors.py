"""One error hierarchy for the whole gateway, mapped to gRPC status codes in one place.

Components raise a :class:`GatewayError` subclass; the transport's interceptor
(:mod:`gateway.interceptors`) turns it into a status. Any other exception becomes INTERNAL
with a generic message, so no detector or backend internals leak to a possible thief.
"""

from __future__ import annotations

import grpc

from contracts.params import ConfigError  # noqa: F401  (re-exported: one error hierarchy)


class GatewayError(Exception):
    """An error whose reason is safe to show to the caller.

    Attributes:
        code: the gRPC status code the caller receives.
        reason: a human-readable message naming what was wrong.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(
        self, reason: str, *, code: grpc.StatusCode | None = None, trailers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        # Extra trailing metadata for the caller, e.g. a retry hint on RESOURCE_EXHAUSTED.
        self.trailers = trailers
        if code is not None:
            self.code = code


class InvalidArgument(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(GatewayError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GatewayError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(GatewayError):
    code = grpc.StatusCode.NOT_FOUND


class ModelNotFound(NotFound):
    """No served model (or version) of that name."""


class ClientNotFound(NotFound):
    """No client of that id in the keys file (admin calls)."""


class ResourceExhausted(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(GatewayError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
