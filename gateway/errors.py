"""One error hierarchy for the whole gateway, mapped to status codes in one place.

Components raise a :class:`GatewayError` subclass whose ``code`` is a canonical status name
(``NOT_FOUND``, ``UNAVAILABLE``, ...: the names gRPC and the Open Inference Protocol share); the
transport's interceptor (:mod:`gateway.interceptors`) turns it into a status. Any other exception
becomes INTERNAL with a generic message, so no detector or backend internals leak to a possible
thief. Nothing here knows the transport, so the data plane does not import grpc.
"""

from __future__ import annotations

from contracts.params import ConfigError  # noqa: F401  (re-exported: one error hierarchy)


class GatewayError(Exception):
    """An error whose reason is safe to show to the caller.

    Attributes:
        code: the canonical name of the status the caller receives (``grpc.StatusCode[code]``).
        reason: a human-readable message naming what was wrong.
    """

    code: str = "INTERNAL"

    def __init__(
        self, reason: str, *, code: str | None = None, trailers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        # Extra trailing metadata for the caller, e.g. a retry hint on RESOURCE_EXHAUSTED.
        self.trailers = trailers
        if code is not None:
            self.code = code


class InvalidArgument(GatewayError):
    code = "INVALID_ARGUMENT"


class Unauthenticated(GatewayError):
    code = "UNAUTHENTICATED"


class PermissionDenied(GatewayError):
    code = "PERMISSION_DENIED"


class NotFound(GatewayError):
    code = "NOT_FOUND"


class ModelNotFound(NotFound):
    """No served model (or version) of that name."""


class ClientNotFound(NotFound):
    """No client of that id in the keys file (admin calls)."""


class ResourceExhausted(GatewayError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(GatewayError):
    code = "UNAVAILABLE"


class DeadlineExceeded(GatewayError):
    code = "DEADLINE_EXCEEDED"
