import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.config import load_config, parse_config
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "deploy" / "configs" / "demo.yaml"


def test_demo_config_loads() -> None:
    config = load_config(DEMO)
    assert [m.name for m in config.models] == ["fashion-classifier", "fashion-encoder"]
    assert [m.kind for m in config.models] == ["classifier", "encoder"]
    assert config.server.max_message_bytes == 64 * 1024 * 1024
    assert config.auth.keys_file == REPO / "deploy" / "configs" / "demo-keys.yaml"


def _demo_data() -> dict:
    return yaml.safe_load(DEMO.read_text())


def _broken(change) -> dict:
    data = _demo_data()
    change(data)
    return data


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        (lambda d: d["server"].update(grpc_port=70000), "server.grpc_port", "port number"),
        (lambda d: d["server"].update(grpc_port=True), "server.grpc_port", "got a boolean"),
        (lambda d: d["server"].update(max_message_bytes="big"), "server.max_message_bytes", "must be int"),
        (lambda d: d["server"].update(grace_seconds=-1), "server.grace_seconds", ">= 0"),
        (lambda d: d["server"].update(grace_seconds=float("nan")), "server.grace_seconds", "finite"),
        (lambda d: d["models"][0]["policy"].update(flag_at=float("nan")), "models[0].policy.flag_at", "finite"),
        (lambda d: d["models"][0]["policy"].update(throttle_per_second=float("inf")),
         "models[0].policy.throttle_per_second", "finite"),
        (lambda d: d["server"].update(deferred_max_rows=-1), "server.deferred_max_rows", ">= 0, got -1"),
        (lambda d: d["server"].update(deferred_max_rows=2.5), "server.deferred_max_rows", "must be int"),
        (lambda d: d["server"].update(detection_commit_ms=-5), "server.detection_commit_ms", "in 0..1000, got -5"),
        (lambda d: d["server"].update(detection_commit_ms="soon"), "server.detection_commit_ms", "must be"),
        (lambda d: d["server"].update(colour="blue"), "server.colour", "unknown field"),
        (lambda d: d["server"].update(tls={"cert_file": "nope.pem", "key_file": "nope.key"}),
         "server.tls.cert_file", "does not exist"),
        (lambda d: d["auth"].update(keys_file="missing.yaml"), "auth.keys_file", "does not exist"),
        (lambda d: d.pop("auth"), "auth", "is required"),
        (lambda d: d.update(models=[]), "models", "non-empty list"),
        (lambda d: d["models"][1].update(kind="regressor"), "models[1].kind", "classifier, encoder"),
        (lambda d: d["models"][1].update(name="fashion-classifier"), "models[1].name", "duplicate"),
        (lambda d: d["models"][0].update(max_batch_size=0), "models[0].max_batch_size", ">= 1"),
        (lambda d: d["models"][0].pop("backend"), "models[0].backend", "is required"),
    ],
)
def test_bad_config_names_the_field(change, field: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_broken(change), DEMO.parent)
    assert caught.value.field == field
    assert problem in caught.value.problem


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("params", "field", "problem"),
    [
        ({"address": "nohostport"}, "models[0].backend.params.address", "host:port"),
        ({}, "models[0].backend.params.address", "is required"),
        ({"address": "h:1", "timeout_seconds": 0}, "models[0].backend.params.timeout_seconds", "positive"),
        ({"address": "h:1", "retries": 3}, "models[0].backend.params.retries", "unknown parameter"),
    ],
)
def test_bad_backend_params_fail_at_build_time(params: dict, field: str, problem: str) -> None:
    from gateway.backends import create_backend
    from gateway.config import ComponentConfig

    with pytest.raises(ConfigError) as caught:
        create_backend("m", ComponentConfig("upstream", params), "models[0].backend")
    assert caught.value.field == field and problem in caught.value.problem


def test_unknown_backend_lists_valid_ones() -> None:
    from gateway.backends import create_backend
    from gateway.config import ComponentConfig

    with pytest.raises(ConfigError, match="unknown backend 'triton'; valid: embedded, upstream"):
        create_backend("m", ComponentConfig("triton", {}), "models[0].backend")


@pytest.mark.parametrize(
    ("params", "field", "problem"),
    [
        ({"inputs": [], "outputs": []}, "models[0].backend.params.inputs", "non-empty list"),
        ({"zoo": "x", "torchscript": "y", "inputs": [{"name": "i", "datatype": "FP32", "shape": [1]}],
          "outputs": [{"name": "o", "datatype": "FP32", "shape": [1]}]},
         "models[0].backend.params", "exactly one model source"),
        ({"torchscript": "/nonexistent.pt", "inputs": [{"name": "i", "datatype": "FP32", "shape": [1]}],
          "outputs": [{"name": "o", "datatype": "FP32", "shape": [1]}]},
         "models[0].backend.params.torchscript", "does not exist"),
        ({"torchscript": "x.pt", "inputs": [{"name": "i", "datatype": "FP33", "shape": [1]}],
          "outputs": [{"name": "o", "datatype": "FP32", "shape": [1]}]},
         "models[0].backend.params.inputs[0].datatype", "must be one of"),
        ({"torchscript": "x.pt", "inputs": [{"name": "i", "datatype": "FP32", "shape": [0, 3]}],
          "outputs": [{"name": "o", "datatype": "FP32", "shape": [1]}]},
         "models[0].backend.params.inputs[0].shape", "positive ints or -1"),
        ({"torchscript": "x.pt", "device": "tpu", "inputs": [{"name": "i", "datatype": "FP32", "shape": [1]}],
          "outputs": [{"name": "o", "datatype": "FP32", "shape": [1]}]},
         "models[0].backend.params.device", "auto, cpu or cuda"),
    ],
)
def test_bad_embedded_params_fail_at_build_time(params: dict, field: str, problem: str) -> None:
    from gateway.backends import create_backend
    from gateway.config import ComponentConfig

    with pytest.raises(ConfigError) as caught:
        create_backend("m", ComponentConfig("embedded", params), "models[0].backend")
    assert caught.value.field == field, caught.value
    assert problem in caught.value.problem


def test_serve_with_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    data = _broken(lambda d: d["models"][1].update(kind="regressor"))
    data["auth"]["keys_file"] = str(DEMO.parent / "demo-keys.yaml")
    data["auth"]["server_secret_file"] = str(DEMO.parent / "demo-secret")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "models[1].kind" in result.stderr and "regressor" in result.stderr
