"""Start and stop the real servers tests need: moat itself, KServe, Redis. No protos imported
here, so both test groups (moat's stubs, and the stock tritonclient) can use these helpers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.endpoint import (
    GatewayProcess,
    free_port,
    grpc_ready,
    launch_gateway,
    redis_ready,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Proc(GatewayProcess):
    """A child process whose output goes to a log file; ``info`` holds what tests need of it."""

    info: dict[str, Any] = field(default_factory=dict)


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    handle = log.open("w")
    popen = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                             env={**os.environ, **(env or {})}, start_new_session=True)
    return Proc(popen, log)


def kserve_python() -> str:
    path = os.environ.get("MOAT_KSERVE_PYTHON", str(REPO / ".venv-kserve" / "bin" / "python"))
    if not Path(path).exists():
        raise RuntimeError(f"KServe's virtualenv is missing at {path}: run `make setup`")
    return path


def start_kserve(workdir: Path, grpc_port: int | None = None) -> Proc:
    """Start tests/servers/kserve_upstream.py; ``info['grpc_port']`` is its gRPC port."""
    port = grpc_port or free_port()
    proc = _spawn([kserve_python(), str(REPO / "tests/servers/kserve_upstream.py"),
                   "--grpc_port", str(port), "--http_port", str(free_port())],
                  workdir / f"kserve-{port}.log")
    proc.info["grpc_port"] = port
    try:
        wait_until(lambda: proc.popen.poll() is not None or grpc_ready(f"127.0.0.1:{port}"), 60, "KServe")
    except TimeoutError:
        proc.stop(signal.SIGKILL)
        raise
    if proc.popen.poll() is not None:
        raise RuntimeError(f"KServe exited early:\n{proc.output()[-3000:]}")
    return proc


def start_gateway(config: Path, workdir: Path, *args: str, timeout: float = 300) -> Proc:
    """Run ``moat serve`` on free ports; ``info`` holds the ports from its 'serving' log line."""
    launched = launch_gateway(config, workdir / f"gateway-{time.monotonic_ns()}.log", *args,
                              timeout=timeout, cwd=REPO)
    return Proc(launched.popen, launched.log, launched.ports, info=dict(launched.ports))


def start_redis(workdir: Path, *options: str) -> Proc:
    """Start a throwaway ``redis-server`` (no persistence) on a free loopback port.

    ``info['port']`` is its port and ``info['url']`` its ``redis://`` URL (database 0).
    """
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = _spawn([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(workdir), *options], workdir / f"redis-{port}.log")
    proc.info.update(port=port, url=f"redis://127.0.0.1:{port}/0")
    try:
        wait_until(lambda: proc.popen.poll() is not None or redis_ready(port), 20, "redis-server")
    except TimeoutError:
        proc.stop(signal.SIGKILL)
        raise
    if proc.popen.poll() is not None:
        raise RuntimeError(f"redis-server exited early:\n{proc.output()[-3000:]}")
    return proc
