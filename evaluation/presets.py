"""Defense presets and the gateways the evaluation runner starts for them.

A preset turns the suite's models into a gateway config: ``none`` serves them unprotected, ``default``
protects each with the demo config's protection for its kind (``deploy/configs/demo.yaml``: PRADA +
coverage + adaptive misinformation + DAWN for classifiers, B4B coverage + per-key transform and
noise for encoders). A suite may also name its own gateway YAML (``{name, config}``); its protection
blocks are taken by model name, else per kind the same way. Keys are generated per client id; the gateway keeps its
state in SQLite under the output directory.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from evaluation.endpoint import GatewayProcess, launch_gateway

__all__ = ["ADMIN_TOKEN", "DEMO_CONFIG", "PRESETS", "api_key", "gateway_config", "start_gateway"]

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "deploy" / "configs" / "demo.yaml"
ADMIN_TOKEN = "moat-eval-admin-token"
_PROTECTION = ("detectors", "defenses", "watermark", "policy")


def api_key(client_id: str) -> str:
    """The API key the runner issues to ``client_id`` (local gateways only)."""
    return f"moat-eval-{client_id}-key"


def _protection_by_kind(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Protection blocks of a gateway config, keyed by model name and (first model of each) by kind;
    a suite model takes its own name's block, else its kind's."""
    out: dict[str, dict[str, Any]] = {}
    for model in config.get("models", []):
        block = {k: copy.deepcopy(model[k]) for k in _PROTECTION if k in model}
        out.setdefault(f"name:{model.get('name')}", block)
        out.setdefault(str(model.get("kind")), block)
    return out


def _none(_: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {}


def _default(_: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return _protection_by_kind(yaml.safe_load(DEMO_CONFIG.read_text()))


#: preset name -> function(preset entry) returning the protection blocks per model kind.
PRESETS: dict[str, Callable[[Mapping[str, Any]], dict[str, dict[str, Any]]]] = {"none": _none, "default": _default}


def _custom(entry: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    path = Path(entry["config"])
    try:
        return _protection_by_kind(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"defenses.{entry['name']}.config: cannot read {path}: {error}") from None


def preset_name(entry: Any) -> str:
    return str(entry["name"]) if isinstance(entry, Mapping) else str(entry)


def _model_block(model: Any, protection: Mapping[str, Any]) -> dict[str, Any]:
    """One ``models`` entry of the gateway config for a suite :class:`~evaluation.suite.ModelEntry`."""
    output = "probabilities" if model.kind == "classifier" else "embedding"
    block = {
        "name": model.name, "kind": model.kind, "max_batch_size": 1024,
        "backend": {"name": "embedded", "params": {
            **copy.deepcopy(dict(model.source)), "device": "auto",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *model.input_shape]}],
            "outputs": [{"name": output, "datatype": "FP32", "shape": [-1, model.num_outputs]}],
        }},
    }
    chosen = protection.get(f"name:{model.name}", protection.get(model.kind, {}))
    block.update(copy.deepcopy(dict(chosen)))
    return block


def gateway_config(models: Sequence[Any], preset: Any, client_ids: Sequence[str], out_dir: Path) -> Path:
    """Write ``out_dir/gateway-<preset>.yaml`` (and its keys file) serving ``models`` under ``preset``."""
    from gateway.auth import hash_key

    name = preset_name(preset)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = out_dir / f"gateway-{name}-keys.yaml"
    keys.write_text(yaml.safe_dump({
        "admin_token_sha256": hash_key(ADMIN_TOKEN),
        "clients": [{"id": c, "key_sha256": hash_key(api_key(c))} for c in client_ids],
    }))
    protection = _custom(preset) if isinstance(preset, Mapping) else PRESETS[name](preset)
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    config = {
        "server": {**demo["server"], "host": "127.0.0.1"},
        "auth": {"keys_file": str(keys), "server_secret_file": str((DEMO_CONFIG.parent / "demo-secret").resolve())},
        "state": {"name": "sqlite", "params": {"path": str((out_dir / f"state-{name}.db").resolve())}},
        "models": [_model_block(m, protection) for m in models],
    }
    path = out_dir / f"gateway-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_gateway(config: Path, out_dir: Path) -> GatewayProcess:
    """``moat serve`` on free loopback ports for ``config``, logging next to it."""
    return launch_gateway(config, out_dir / f"{config.stem}.log", timeout=900.0, cwd=REPO)
