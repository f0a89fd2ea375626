"""Issue 26: another process holding the SQLite file's write lock is UNAVAILABLE, never INTERNAL,
and the gateway answers again once the lock is gone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import inference_pb2 as pb
from tests.integration.conftest import BOB, GatewayFactory, embedded_model, stub

LOCKER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
connection.execute("ROLLBACK")
"""


def _request(seed: int) -> pb.ModelInferRequest:
    images = np.random.default_rng(seed).random((2, 1, 4, 4), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype="FP32", shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    return request


async def test_a_locked_sqlite_file_is_unavailable_then_recovers(make_gateway: GatewayFactory, tiny_torchscript: Path,
                                                                tmp_path: Path) -> None:
    model = embedded_model("tiny", tiny_torchscript)
    model["detectors"] = [{"name": "coverage", "params": {"tables": 4, "bits": 6, "alert_coverage": 60}}]
    path = tmp_path / "state.db"
    # deferred_max_rows 0: every request is detected (written) before its answer.
    gateway = await make_gateway([model], state={"name": "sqlite", "params": {"path": str(path), "busy_timeout_ms": 200}},
                                 deferred_max_rows=0)
    client = stub(gateway.ports.grpc)
    await client.ModelInfer(_request(0), metadata=BOB)  # the file exists, the client is known
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.ModelInfer(_request(1), metadata=BOB)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert "state store is unavailable" in caught.value.details()
    finally:
        locker.communicate("", timeout=30)
    reply = await client.ModelInfer(_request(2), metadata=BOB)
    assert len(reply.raw_output_contents) == 1
