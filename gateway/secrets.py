"""The server secret, and the keys and seeds derived from it.

One secret keys everything a thief must not predict: LSH hyperplanes, per-client transforms,
noise and watermarks. It comes from a file or an environment variable, never from the YAML.
Replicas that share it hash, transform and watermark identically.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from contracts.params import ConfigError
from gateway.config import AuthConfig

MIN_SECRET_BYTES = 16


def load_server_secret(auth: AuthConfig) -> bytes | None:
    """The secret from ``auth.server_secret_file`` or ``$auth.server_secret_env``; None if neither."""
    if auth.server_secret_file is not None:
        secret, field = auth.server_secret_file.read_bytes().strip(), "auth.server_secret_file"
    elif auth.server_secret_env is not None:
        value = os.environ.get(auth.server_secret_env)
        if value is None:
            raise ConfigError("auth.server_secret_env", f"environment variable {auth.server_secret_env} is not set")
        secret, field = value.strip().encode(), "auth.server_secret_env"
    else:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(field, f"the secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
    return secret


def derive_key(secret: bytes, *parts: str) -> bytes:
    """A 32-byte key for one purpose: HMAC-SHA256(secret, parts joined by NUL)."""
    return hmac.new(secret, "\0".join(parts).encode(), hashlib.sha256).digest()


def derive_seed(secret: bytes, *parts: str) -> int:
    """A 63-bit integer seed for one purpose, from :func:`derive_key`."""
    return int.from_bytes(derive_key(secret, *parts)[:8], "big") >> 1
