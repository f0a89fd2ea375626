"""Public demo credentials never serve beyond loopback.

The demo keys and server secret in ``deploy/configs`` are public (the README prints them): with
them, anyone can call the gateway and predict its LSH planes, transforms, noise and watermark. A
gateway that would listen on a non-loopback address with any of them refuses to start.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable

from contracts.params import ConfigError
from gateway.auth import hash_key
from gateway.config import AuthConfig, ServerConfig

#: SHA-256 of ``deploy/configs/demo-secret`` (stripped, as the gateway reads it).
DEMO_SECRET_SHA256 = "8c081fe733ff820ff826c1dfa5e414452a6dc36cafae91e1445c1f26aeaaf8ba"
#: The demo keys of ``deploy/configs/demo-keys.yaml``, whose plain text the README shows.
DEMO_KEYS = ("demo-admin-token", "demo-alice-key", "demo-bob-key")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address; names are not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_demo_credentials_beyond_loopback(server: ServerConfig, auth: AuthConfig, secret: bytes | None,
                                            key_hashes: Iterable[str]) -> None:
    """``ConfigError`` naming the credential when the public or admin listener is not on loopback
    and the server secret or any key (client or admin) is a public demo one."""
    exposed = [(field, host) for field, host in (("server.host", server.host), ("server.admin_host", server.admin_host))
               if not is_loopback(host)]
    if not exposed:
        return
    field, host = exposed[0]
    where = f"{field} is {host}; the demo credentials serve on loopback only (see README: make keys and a secret)"
    if secret is not None and hashlib.sha256(secret).hexdigest() == DEMO_SECRET_SHA256:
        name = "auth.server_secret_file" if auth.server_secret_file is not None else "auth.server_secret_env"
        raise ConfigError(name, f"is the public demo secret, and {where}")
    demo = {hash_key(key) for key in DEMO_KEYS}
    if demo & set(key_hashes):
        raise ConfigError("auth.keys_file", f"holds a public demo key, and {where}")
