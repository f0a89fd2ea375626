"""Backends answer clean inference: an in-process PyTorch model or an upstream OIP server."""

from gateway.backends.base import BACKENDS, Backend, create_backend

__all__ = ["BACKENDS", "Backend", "create_backend"]
