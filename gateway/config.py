"""The gateway's YAML configuration, loaded into typed dataclasses and validated at start-up.

Every problem raises :class:`~gateway.errors.ConfigError` naming the field by its path
(``models[1].backend.params.address``), so a bad file stops start-up with a precise message.
Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from contracts.params import Fields
from gateway.errors import ConfigError

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MODEL_KINDS = ("classifier", "encoder")


@dataclass(frozen=True)
class TLSConfig:
    """Server TLS; ``client_ca_file`` turns on mutual TLS (clients must present a certificate)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


@dataclass(frozen=True)
class ServerConfig:
    # The public (inference) listener's address. The admin and metrics listeners have their own,
    # loopback by default: publishing the public port must not publish them too.
    host: str = "127.0.0.1"
    admin_host: str = "127.0.0.1"
    metrics_host: str = "127.0.0.1"
    grpc_port: int = 8001
    metrics_port: int = 8002
    admin_port: int = 8003
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_seconds: float = 10.0
    tls: TLSConfig | None = None
    # Requests of at most this many rows are answered before their own detection runs (it runs
    # after, in order per client); 0 detects every request before answering it.
    deferred_max_rows: int = 64
    # Deferred detection on a local store (memory, sqlite) commits at most this often (group
    # commit); a kill -9 loses the detection of at most this span's answers. 0: after every batch.
    # 50 ms is where a longer span stops saving gateway CPU per request.
    detection_commit_ms: float = 50.0


@dataclass(frozen=True)
class AuthConfig:
    keys_file: Path
    # The server secret keys LSH hyperplanes, per-client transforms, noise and watermarks.
    server_secret_file: Path | None = None
    server_secret_env: str | None = None


@dataclass(frozen=True)
class PolicyConfig:
    """How a model reads its detectors' combined suspicion (the max of their scores, in [0, 1])."""

    flag_at: float = 1.0
    throttle_at: float | None = None
    throttle_per_second: float = 1.0
    block_at: float | None = None


@dataclass(frozen=True)
class ComponentConfig:
    """A ``{name, params}`` entry resolved through a registry when the gateway is built."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    kind: str
    backend: ComponentConfig
    # Largest batch one request may carry; bigger requests are refused with INVALID_ARGUMENT.
    max_batch_size: int = 1024
    detectors: tuple[ComponentConfig, ...] = ()
    defenses: tuple[ComponentConfig, ...] = ()
    policy: PolicyConfig = PolicyConfig()
    # A rule watermark (region-shift) marks the clean answer before the defenses; an evidence
    # watermark (dawn, direction) runs after them, its evidence durable before the answer leaves.
    watermark: ComponentConfig | None = None

    @property
    def protected(self) -> bool:
        return bool(self.detectors or self.defenses or self.watermark)


@dataclass(frozen=True)
class TierConfig:
    """What a tier of keys changes for every protected model.

    ``detectors``/``defenses`` map a component name to parameter overrides, or to ``False`` to
    switch that component off for the tier; ``policy`` overrides policy fields; ``watermark: false``
    switches the models' watermarks off for the tier; a ``trusted`` tier (an allow-list for
    internal callers) skips detection, defenses, watermarks and escalation altogether.
    """

    name: str
    trusted: bool = False
    detectors: Mapping[str, Mapping[str, Any] | bool] = field(default_factory=dict)
    defenses: Mapping[str, Mapping[str, Any] | bool] = field(default_factory=dict)
    policy: Mapping[str, Any] = field(default_factory=dict)
    watermark: bool = True


DEFAULT_TIER = "standard"


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig
    auth: AuthConfig
    models: tuple[ModelConfig, ...]
    state: ComponentConfig = ComponentConfig("memory")
    tiers: tuple[TierConfig, ...] = (TierConfig(DEFAULT_TIER),)
    source: Path | None = None

    def tier(self, name: str) -> TierConfig:
        return next(t for t in self.tiers if t.name == name)


def _port(fields: Fields, key: str, default: int) -> int:
    port = fields.get(key, int, default)
    if not 0 <= port <= 65535:
        raise ConfigError(fields.name(key), f"must be a port number in 0..65535, got {port}")
    return port


def _path(fields: Fields, key: str, base: Path, default: Any = ...) -> Path | None:
    value = fields.get(key, str, default)
    if value is None:
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ConfigError(fields.name(key), f"file {str(path)!r} does not exist")
    return path


def _tls(data: Any, path: str, base: Path) -> TLSConfig | None:
    if data is None:
        return None
    fields = Fields(data, path, {"cert_file", "key_file", "client_ca_file"})
    return TLSConfig(
        cert_file=_path(fields, "cert_file", base),  # type: ignore[arg-type]
        key_file=_path(fields, "key_file", base),  # type: ignore[arg-type]
        client_ca_file=_path(fields, "client_ca_file", base, None),
    )


def _server(data: Any, base: Path) -> ServerConfig:
    fields = Fields(data or {}, "server", {
        "host", "admin_host", "metrics_host", "grpc_port", "metrics_port", "admin_port", "max_message_bytes",
        "grace_seconds", "tls", "deferred_max_rows", "detection_commit_ms",
    })
    defaults = ServerConfig()
    max_bytes = fields.get("max_message_bytes", int, defaults.max_message_bytes)
    if max_bytes < 1024:
        raise ConfigError(fields.name("max_message_bytes"), f"must be at least 1024, got {max_bytes}")
    grace = float(fields.get("grace_seconds", (int, float), defaults.grace_seconds))
    if grace < 0:
        raise ConfigError(fields.name("grace_seconds"), f"must be >= 0, got {grace}")
    deferred = fields.get("deferred_max_rows", int, defaults.deferred_max_rows)
    if deferred < 0:
        raise ConfigError(fields.name("deferred_max_rows"), f"must be >= 0, got {deferred}")
    commit_ms = float(fields.get("detection_commit_ms", (int, float), defaults.detection_commit_ms))
    if not 0 <= commit_ms <= 1000:
        raise ConfigError(fields.name("detection_commit_ms"), f"must be in 0..1000, got {commit_ms}")
    return ServerConfig(
        host=fields.get("host", str, defaults.host),
        admin_host=fields.get("admin_host", str, defaults.admin_host),
        metrics_host=fields.get("metrics_host", str, defaults.metrics_host),
        grpc_port=_port(fields, "grpc_port", defaults.grpc_port),
        metrics_port=_port(fields, "metrics_port", defaults.metrics_port),
        admin_port=_port(fields, "admin_port", defaults.admin_port),
        max_message_bytes=max_bytes,
        grace_seconds=grace,
        tls=_tls(fields.data.get("tls"), fields.name("tls"), base),
        deferred_max_rows=deferred,
        detection_commit_ms=commit_ms,
    )


def _component(data: Any, path: str) -> ComponentConfig:
    fields = Fields(data, path, {"name", "params"})
    name = fields.get("name", str)
    params = fields.get("params", Mapping, {}) or {}
    return ComponentConfig(name=name, params=dict(params))


def _models(data: Any) -> tuple[ModelConfig, ...]:
    if not isinstance(data, list) or not data:
        raise ConfigError("models", "must be a non-empty list of model entries")
    models: list[ModelConfig] = []
    for index, entry in enumerate(data):
        fields = Fields(entry, f"models[{index}]", {
            "name", "kind", "backend", "max_batch_size", "detectors", "defenses", "policy", "watermark"})
        name = fields.get("name", str)
        if not name or "/" in name:
            raise ConfigError(fields.name("name"), f"must be a non-empty name without '/', got {name!r}")
        if any(model.name == name for model in models):
            raise ConfigError(fields.name("name"), f"duplicate model name {name!r}")
        kind = fields.get("kind", str)
        if kind not in MODEL_KINDS:
            raise ConfigError(fields.name("kind"), f"must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
        backend = _component(fields.get("backend", Mapping), fields.name("backend"))
        max_batch = fields.get("max_batch_size", int, 1024)
        if max_batch < 1:
            raise ConfigError(fields.name("max_batch_size"), f"must be >= 1, got {max_batch}")
        models.append(ModelConfig(
            name=name, kind=kind, backend=backend, max_batch_size=max_batch,
            detectors=_components(fields, "detectors"), defenses=_components(fields, "defenses"),
            policy=_policy(fields.data.get("policy"), fields.name("policy")),
            watermark=_watermark(fields),
        ))
    return tuple(models)


def _watermark(fields: Fields) -> ComponentConfig | None:
    """``watermark: {name, params}``, or None when absent or null."""
    data = fields.data.get("watermark")
    return None if data is None else _component(data, fields.name("watermark"))


def _components(fields: Fields, key: str) -> tuple[ComponentConfig, ...]:
    entries = fields.get(key, list, [])
    components = tuple(_component(entry, f"{fields.name(key)}[{i}]") for i, entry in enumerate(entries))
    names = [c.name for c in components]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError(fields.name(key), f"lists {duplicate!r} twice")
    return components


def _threshold(fields: Fields, key: str, default: float | None) -> float | None:
    value = fields.get(key, (int, float, type(None)), default)
    if value is not None and not 0 <= value <= 1:
        raise ConfigError(fields.name(key), f"must be a suspicion level in [0, 1], got {value}")
    return None if value is None else float(value)


def tier_policy(base: PolicyConfig, overrides: Mapping[str, Any], path: str) -> PolicyConfig:
    """``base`` with a tier's policy overrides applied (validated like a policy)."""
    merged = {name: getattr(base, name) for name in ("flag_at", "throttle_at", "throttle_per_second", "block_at")}
    return replace(base, **{k: v for k, v in vars(_policy({**merged, **overrides}, path)).items()})


def _policy(data: Any, path: str) -> PolicyConfig:
    fields = Fields(data or {}, path, {"flag_at", "throttle_at", "throttle_per_second", "block_at"})
    rate = fields.get("throttle_per_second", (int, float), 1.0)
    if rate <= 0:
        raise ConfigError(fields.name("throttle_per_second"), f"must be > 0, got {rate}")
    return PolicyConfig(
        flag_at=_threshold(fields, "flag_at", 1.0),  # type: ignore[arg-type]
        throttle_at=_threshold(fields, "throttle_at", None),
        throttle_per_second=float(rate),
        block_at=_threshold(fields, "block_at", None),
    )


def _auth(fields: Fields, base: Path) -> AuthConfig:
    env = fields.get("server_secret_env", str, None)
    return AuthConfig(
        keys_file=_path(fields, "keys_file", base),  # type: ignore[arg-type]
        server_secret_file=_path(fields, "server_secret_file", base, None),
        server_secret_env=env,
    )


def _expand_env(value: Any) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of the document."""
    if isinstance(value, str):
        return _ENV_PATTERN.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [_expand_env(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _expand_env(item) for key, item in value.items()}
    return value


_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _overrides(fields: Fields, key: str) -> dict[str, Mapping[str, Any] | bool]:
    entries = fields.get(key, Mapping, {}) or {}
    for name, value in entries.items():
        if value is not False and not isinstance(value, Mapping):
            raise ConfigError(f"{fields.name(key)}.{name}", "must be a mapping of parameter overrides, or false")
    return {name: (False if value is False else dict(value)) for name, value in entries.items()}


def _tiers(data: Any) -> tuple[TierConfig, ...]:
    entries = {} if data is None else data
    if not isinstance(entries, Mapping):
        raise ConfigError("tiers", "must be a mapping of tier name to its settings")
    tiers = [] if DEFAULT_TIER in entries else [TierConfig(DEFAULT_TIER)]
    for name, settings in entries.items():
        fields = Fields(settings or {}, f"tiers.{name}", {"trusted", "detectors", "defenses", "policy", "watermark"})
        policy = fields.get("policy", Mapping, {}) or {}
        _policy(policy, fields.name("policy"))  # the overrides alone must be valid
        tiers.append(TierConfig(
            name=str(name), trusted=fields.get("trusted", bool, False),
            detectors=_overrides(fields, "detectors"), defenses=_overrides(fields, "defenses"),
            policy=dict(policy), watermark=fields.get("watermark", bool, True),
        ))
    return tuple(tiers)


def parse_config(data: Any, base_dir: Path, source: Path | None = None) -> GatewayConfig:
    """Validate a parsed YAML document; relative paths resolve against ``base_dir``."""
    data = _expand_env(data)
    fields = Fields(data, "", {"server", "auth", "models", "state", "tiers"})
    auth = _auth(Fields(fields.get("auth", Mapping), "auth", {
        "keys_file", "server_secret_file", "server_secret_env"}), base_dir)
    models = _models(fields.get("models", list))
    if any(model.protected for model in models) and not (auth.server_secret_file or auth.server_secret_env):
        raise ConfigError("auth.server_secret_file", "is required when a model has detectors, defenses or a watermark")
    state = fields.data.get("state")
    return GatewayConfig(
        server=_server(fields.data.get("server"), base_dir),
        auth=auth,
        models=models,
        state=ComponentConfig("memory") if state is None else _component(state, "state"),
        tiers=_tiers(fields.data.get("tiers")),
        source=source,
    )


def load_config(path: str | Path) -> GatewayConfig:
    """Load and validate the YAML file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError("config", f"cannot read {str(path)!r}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError("config", f"{path} is not valid YAML: {error}") from None
    return parse_config(data, path.resolve().parent, source=path)
