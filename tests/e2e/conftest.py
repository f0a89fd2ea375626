"""Black-box fixtures: `moat serve` as a subprocess, driven by the stock tritonclient.

This process must never import moat's `protos.inference_pb2` (it would clash with
tritonclient's own `inference` protos in protobuf's global descriptor pool).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as triton
import yaml

from tests.servers.procs import REPO, Proc, start_gateway

DEMO_CONFIG = REPO / "deploy" / "configs" / "demo.yaml"
ALICE = {"authorization": "Bearer demo-alice-key"}
BOB = {"x-api-key": "demo-bob-key"}


def client(proc: Proc) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{proc.info['grpc']}")


def write_config(path: Path, base: Path = DEMO_CONFIG, **server: object) -> Path:
    """A copy of ``base`` with ``server`` overrides; its relative file paths are made absolute."""
    data = yaml.safe_load(base.read_text())
    for field in ("keys_file", "server_secret_file"):
        if field in data["auth"]:
            data["auth"][field] = str((base.parent / data["auth"][field]).resolve())
    data["server"].update(server)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session", autouse=True)
def isolated_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every gateway of this session keeps its SQLite state in a fresh directory."""
    state = tmp_path_factory.mktemp("state")
    previous = os.environ.get("MOAT_STATE_DIR")
    os.environ["MOAT_STATE_DIR"] = str(state)
    yield state
    if previous is None:
        os.environ.pop("MOAT_STATE_DIR", None)
    else:
        os.environ["MOAT_STATE_DIR"] = previous


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """The demo gateway (embedded zoo models; the first start trains and caches them)."""
    proc = start_gateway(DEMO_CONFIG, tmp_path_factory.mktemp("demo"), timeout=900)
    yield proc
    proc.stop()


def infer_input(name: str, array, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


DEMO_SECRET = (REPO / "deploy" / "configs" / "demo-secret").read_bytes().strip()
PROTECTION_CLIENTS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace")


def key_of(client: str) -> dict[str, str]:
    return {"authorization": f"Bearer {client}-test-key"}


def protected_config(path: Path, state: dict, *, models: list[str] | None = None,
                     edit=None) -> Path:
    """The demo config with its own keys file (clients above), the given state store, and
    optionally only some models; ``edit(data)`` may change anything else."""
    from gateway.auth import hash_key

    keys = path.parent / f"{path.stem}-keys.yaml"
    keys.write_text(yaml.safe_dump({
        "admin_token_sha256": hash_key("test-admin-token"),
        "clients": [{"id": c, "key_sha256": hash_key(f"{c}-test-key")} for c in PROTECTION_CLIENTS],
    }))
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["auth"] = {"keys_file": str(keys), "server_secret_file": str(DEMO_CONFIG.parent / "demo-secret")}
    data["state"] = state
    if models is not None:
        data["models"] = [m for m in data["models"] if m["name"] in models]
    if edit is not None:
        edit(data)
    path.write_text(yaml.safe_dump(data))
    return path


def admin_client(proc: Proc):
    from gateway.admin_client import AdminClient

    return AdminClient(f"127.0.0.1:{proc.info['admin']}", "test-admin-token")


def model_state(proc: Proc, client: str, model: str) -> dict:
    with admin_client(proc) as admin:
        summary = admin.get_client(client)
    return next(m for m in summary["models"] if m["model"] == model)


def query(proc: Proc, model: str, client_id: str, images, batch: int = 250):
    """Send ``images`` float32 [N,1,28,28] in batches as ``client_id``; returns the stacked answers."""
    import numpy as np

    output = "probabilities" if model == "fashion-classifier" else "embedding"
    c = client(proc)
    answers = []
    for start in range(0, len(images), batch):
        chunk = np.ascontiguousarray(images[start:start + batch], dtype=np.float32)
        result = c.infer(model, [infer_input("input", chunk, "FP32")], headers=key_of(client_id))
        answers.append(result.as_numpy(output))
    return np.concatenate(answers)

