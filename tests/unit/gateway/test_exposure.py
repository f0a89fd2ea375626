"""Issue 26: the public demo credentials never serve beyond loopback, and no image starts with them."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.exposure import is_loopback
from gateway.server import Gateway

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "deploy" / "configs" / "demo.yaml"


def _demo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *, own_secret: bool = False, own_keys: bool = False,
          **server: str):  # type: ignore[no-untyped-def]
    for name in ("MOAT_KEYS_FILE", "MOAT_SERVER_SECRET_FILE"):
        monkeypatch.delenv(name, raising=False)
    if own_secret:
        (tmp_path / "secret").write_text("a-secret-of-this-deployment-only")
        monkeypatch.setenv("MOAT_SERVER_SECRET_FILE", str(tmp_path / "secret"))
    if own_keys:
        (tmp_path / "keys.yaml").write_text("admin_token_sha256: " + "ab" * 32 + "\nclients: []\n")
        monkeypatch.setenv("MOAT_KEYS_FILE", str(tmp_path / "keys.yaml"))
    monkeypatch.setenv("MOAT_STATE_DIR", str(tmp_path / "state"))
    config = load_config(DEMO)
    return dataclasses.replace(config, server=dataclasses.replace(config.server, **server))


def test_demo_secret_on_a_public_address_is_refused_before_anything_is_built(monkeypatch, tmp_path) -> None:
    config = _demo(monkeypatch, tmp_path, host="0.0.0.0")
    with pytest.raises(ConfigError) as caught:
        Gateway(config)
    assert caught.value.field == "auth.server_secret_file"
    assert "public demo secret" in caught.value.problem and "server.host is 0.0.0.0" in caught.value.problem
    assert not (tmp_path / "state").exists()  # no state store was opened


def test_demo_keys_with_a_secret_of_ones_own_are_refused_too(monkeypatch, tmp_path) -> None:
    config = _demo(monkeypatch, tmp_path, own_secret=True, admin_host="10.1.2.3")
    with pytest.raises(ConfigError) as caught:
        Gateway(config)
    assert caught.value.field == "auth.keys_file"
    assert "public demo key" in caught.value.problem and "server.admin_host is 10.1.2.3" in caught.value.problem


def test_own_credentials_may_serve_publicly(monkeypatch, tmp_path) -> None:
    from gateway.exposure import refuse_demo_credentials_beyond_loopback

    config = _demo(monkeypatch, tmp_path, own_secret=True, own_keys=True, host="0.0.0.0")
    refuse_demo_credentials_beyond_loopback(config.server, config.auth, b"a-secret-of-this-deployment-only",
                                            ["ab" * 32])


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("moat.internal", False)])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_no_image_starts_with_the_demo_credentials(monkeypatch) -> None:
    """Each image's default command, under its own environment, names keys and a secret that are
    not the demo ones (they are mounted secrets, absent here)."""
    text = re.sub(r"^#.*\n", "", (REPO / "deploy" / "Dockerfile").read_text(), flags=re.M)
    for stage in ("proxy", "full"):
        body = text.split(f"AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        command = re.search(r'^CMD \[(.*)\]$', body, re.M)
        assert command, stage
        config = re.search(r'"--config", "([^"]+)"', command.group(1)).group(1)
        source = {"/etc/moat/config.yaml": "sidecar.yaml"}.get(config, Path(config).name)
        env = dict(re.findall(r"(MOAT_[A-Z_]+)=(\S+)", " ".join(re.findall(r"^ENV (.*)$", body, re.M))))
        for name in ("MOAT_KEYS_FILE", "MOAT_SERVER_SECRET_FILE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        raw = (REPO / "deploy" / "configs" / source).read_text()
        auth = re.search(r"^auth:\n((?:  .*\n)+)", raw, re.M).group(1)
        paths = [re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), line.split(": ", 1)[1])
                 for line in auth.strip().splitlines()]
        assert all(p.startswith("/run/secrets/") for p in paths), (stage, paths)
