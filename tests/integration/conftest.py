"""Fixtures for gateways run in-process over real gRPC, in front of real upstream servers."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml

from gateway.auth import hash_key
from gateway.config import load_config
from gateway.server import Gateway, build_gateway
from protos import inference_pb2_grpc
from tests.servers.procs import Proc, start_kserve

ALICE = (("authorization", "Bearer alice-key"),)
BOB = (("x-api-key", "bob-key"),)
ADMIN = (("authorization", "Bearer admin-token"),)
TINY_INPUT = {"name": "input", "datatype": "FP32", "shape": [-1, 1, 4, 4]}
TINY_OUTPUT = {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}


class TinyNet(torch.nn.Module):
    """FP32 [B,1,4,4] -> softmax probabilities [B,3]."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x.flatten(1)), dim=1)


@pytest.fixture(scope="session")
def tiny_torchscript(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    torch.jit.script(TinyNet().eval()).save(str(path))
    return path


@pytest.fixture(scope="session")
def kserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_kserve(tmp_path_factory.mktemp("kserve"))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(yaml.safe_dump({
        "admin_token_sha256": hash_key("admin-token"),
        "clients": [{"id": "alice", "key_sha256": hash_key("alice-key")},
                    {"id": "bob", "key_sha256": hash_key("bob-key"), "tier": "premium"}],
    }))
    return path


def embedded_model(name: str, torchscript: Path) -> dict[str, Any]:
    return {"name": name, "kind": "classifier", "backend": {"name": "embedded", "params": {
        "torchscript": str(torchscript), "device": "cpu", "inputs": [TINY_INPUT], "outputs": [TINY_OUTPUT]}}}


def upstream_model(name: str, port: int, upstream_name: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"address": f"127.0.0.1:{port}", "timeout_seconds": 10}
    if upstream_name:
        params["model"] = upstream_name
    return {"name": name, "kind": "classifier", "backend": {"name": "upstream", "params": params}}


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(tmp_path: Path, keys_file: Path) -> AsyncIterator[GatewayFactory]:
    """Start in-process gateways on free ports; all are stopped after the test."""
    started: list[Gateway] = []

    secret = tmp_path / "secret"
    secret.write_text("integration-test-secret-0123456789")

    async def make(models: list[dict[str, Any]], state: dict[str, Any] | None = None,
                   tiers: dict[str, Any] | None = None, **server: Any) -> Gateway:
        config = {"server": {"grpc_port": 0, "admin_port": 0, "metrics_port": 0, **server},
                  "auth": {"keys_file": str(keys_file), "server_secret_file": str(secret)}, "models": models,
                  "tiers": tiers if tiers is not None else {"premium": {}}}
        if state is not None:
            config["state"] = state
        path = tmp_path / f"config-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config))
        gateway = build_gateway(load_config(path))
        await gateway.start()
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        await gateway.stop(grace=1)


def stub(port: int, max_bytes: int = 64 * 1024 * 1024) -> inference_pb2_grpc.GRPCInferenceServiceStub:
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)],
    )
    return inference_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=moat-test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}
