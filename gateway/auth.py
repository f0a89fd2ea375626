"""API-key authentication: keys are stored as SHA-256 hashes and map to client ids.

The keys file (YAML, a secret mounted at run time) looks like::

    admin_token_sha256: <hex digest of the admin token>
    clients:
      - id: alice
        tier: standard
        key_sha256: <hex digest of alice's key>

A key arrives in gRPC metadata as ``authorization: Bearer <key>`` or ``x-api-key: <key>``.
It is hashed and looked up; it is never logged and never forwarded upstream.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.errors import ConfigError, Unauthenticated

_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# Metadata keys that carry credentials; the upstream backend strips exactly these.
CREDENTIAL_HEADERS = ("authorization", "x-api-key")


def hash_key(key: str) -> str:
    """The lowercase hex SHA-256 of ``key``, as stored in the keys file."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Client:
    """An authenticated caller."""

    id: str
    tier: str = "standard"


def presented_key(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The API key in ``metadata`` (``authorization: Bearer`` first, then ``x-api-key``)."""
    found: dict[str, str] = {}
    for name, value in metadata:
        if name in CREDENTIAL_HEADERS and isinstance(value, str):
            found.setdefault(name, value)
    bearer = found.get("authorization", "")
    if bearer[:7].lower() == "bearer " and bearer[7:].strip():
        return bearer[7:].strip()
    key = found.get("x-api-key", "").strip()
    return key or None


class KeyStore:
    """Hashed API keys -> clients, plus the hashed admin token."""

    def __init__(self, clients_by_hash: dict[str, Client], admin_token_sha256: str | None) -> None:
        self._clients_by_hash = dict(clients_by_hash)
        self._admin_hash = admin_token_sha256

    def key_hashes(self) -> list[str]:
        """The SHA-256 of every key this store accepts, the admin token's included."""
        return [*self._clients_by_hash, *([self._admin_hash] if self._admin_hash else [])]

    @property
    def clients(self) -> list[Client]:
        """Every configured client, sorted by id (a client may own several keys)."""
        unique = {client.id: client for client in self._clients_by_hash.values()}
        return [unique[name] for name in sorted(unique)]

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Client:
        """The client whose key is in ``metadata``; ``Unauthenticated`` when none or unknown."""
        key = presented_key(metadata)
        if key is None:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>' or 'x-api-key'")
        client = self._clients_by_hash.get(hash_key(key))
        if client is None:
            raise Unauthenticated("invalid API key")
        return client

    def check_admin(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        """Raise ``Unauthenticated`` unless ``metadata`` carries the admin token."""
        token = presented_key(metadata)
        if token is None or self._admin_hash is None:
            raise Unauthenticated("missing admin token")
        if not hmac.compare_digest(hash_key(token), self._admin_hash):
            raise Unauthenticated("invalid admin token")

    @classmethod
    def from_file(cls, path: Path) -> KeyStore:
        """Load and validate a keys file; ``ConfigError`` names the bad field."""
        where = f"keys file {path}"
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(where, f"cannot be read as YAML: {error}") from None
        return cls.from_mapping(data, where)

    @classmethod
    def from_mapping(cls, data: Any, where: str = "keys") -> KeyStore:
        if not isinstance(data, dict):
            raise ConfigError(where, "must be a mapping with 'clients'")
        unknown = sorted(set(data) - {"clients", "admin_token_sha256"})
        if unknown:
            raise ConfigError(f"{where}: {unknown[0]}", "unknown field; valid: admin_token_sha256, clients")
        admin = data.get("admin_token_sha256")
        if admin is not None:
            admin = _digest(admin, f"{where}: admin_token_sha256")
        entries = data.get("clients")
        if not isinstance(entries, list):
            raise ConfigError(f"{where}: clients", "must be a list of {id, key_sha256, tier}")
        by_hash: dict[str, Client] = {}
        for index, entry in enumerate(entries):
            digest, client = _client(entry, f"{where}: clients[{index}]")
            if digest in by_hash:
                raise ConfigError(f"{where}: clients[{index}].key_sha256", "the same key is listed twice")
            by_hash[digest] = client
        return cls(by_hash, admin)


def _digest(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _HEX_DIGEST.match(value.lower()):
        raise ConfigError(field, "must be a 64-character hex SHA-256 digest (see `moat keys hash`)")
    return value.lower()


def _client(entry: Any, where: str) -> tuple[str, Client]:
    if not isinstance(entry, dict):
        raise ConfigError(where, "must be a mapping with id and key_sha256")
    unknown = sorted(set(entry) - {"id", "key_sha256", "tier"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", "unknown field; valid: id, key_sha256, tier")
    client_id = entry.get("id")
    if not isinstance(client_id, str) or not client_id or "/" in client_id:
        raise ConfigError(f"{where}.id", "must be a non-empty string without '/'")
    tier = entry.get("tier", "standard")
    if not isinstance(tier, str) or not tier:
        raise ConfigError(f"{where}.tier", "must be a non-empty string")
    return _digest(entry.get("key_sha256"), f"{where}.key_sha256"), Client(client_id, tier)
