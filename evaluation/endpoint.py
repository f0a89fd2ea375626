"""Launch a moat gateway as a child process on free loopback ports and wait until it serves.

The evaluation suite and the demo talk to the gateway like any client would, over the network,
so they run it as its own process (`moat serve`) rather than in-process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def grpc_ready(address: str, timeout: float = 0.5) -> bool:
    """Whether a gRPC server accepts connections at ``address`` within ``timeout`` seconds."""
    import grpc

    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def redis_ready(port: int) -> bool:
    """Whether a Redis on loopback ``port`` answers PING (raw RESP, so no client library needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``check`` until it returns something other than None or False; ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class GatewayProcess:
    """A running `moat serve`; ``ports`` has ``grpc``, ``admin`` and ``metrics``."""

    popen: subprocess.Popen
    log: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the gateway and wait for it; kills it if it outlives ``timeout``."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(timeout=10)


def _serving_line(process: GatewayProcess) -> dict[str, Any] | None:
    for line in process.output().splitlines():
        if '"event": "serving"' in line:
            return json.loads(line)
    return None


def launch_gateway(config: str | os.PathLike[str], log: str | os.PathLike[str], *extra: str,
                   timeout: float = 900.0, cwd: str | os.PathLike[str] | None = None) -> GatewayProcess:
    """Start ``moat serve --config config`` on free ports, logging to ``log``.

    Returns once the gateway logs that it serves; raises ``RuntimeError`` with the log's tail if it
    exits first and ``TimeoutError`` after ``timeout`` seconds (the first start may train the zoo).
    """
    log = Path(log)
    handle = log.open("w")
    popen = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
         "--grpc-port", "0", "--admin-port", "0", "--metrics-port", "0", *extra],
        stdout=handle, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
    )
    handle.close()
    process = GatewayProcess(popen, log)
    deadline = time.monotonic() + timeout
    while (serving := _serving_line(process)) is None:
        if popen.poll() is not None:
            raise RuntimeError(f"moat serve exited with {popen.returncode}:\n{process.output()[-3000:]}")
        if time.monotonic() > deadline:
            process.stop(signal.SIGKILL)
            raise TimeoutError(f"moat serve did not start within {timeout}s:\n{process.output()[-3000:]}")
        time.sleep(0.2)
    process.ports = {name: int(serving[name]) for name in ("grpc", "admin", "metrics")}
    return process
