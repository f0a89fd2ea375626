"""Child processes the bench starts and stops: KServe with the demo models, the bare proxy, moat
gateways and redis-server. Each logs to a file in the bench's work directory; all are stopped by
:class:`Processes` on exit. No protos are imported here (the client side uses tritonclient)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Callable
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

REPO = Path(__file__).resolve().parents[1]


class Processes:
    """Starts the bench's servers; ``close()`` (or leaving the ``with``) stops every one."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._procs: list[GatewayProcess] = []
        self.pids: dict[str, int] = {}  # the proxy's and each gateway's process, by contender

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in reversed(self._procs):
            proc.stop(signal.SIGTERM, timeout=15)
        self._procs.clear()

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> GatewayProcess:
        log = self.workdir / f"{name}.log"
        with log.open("w") as handle:
            popen = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        proc = GatewayProcess(popen, log)
        self._procs.append(proc)
        return proc

    def _wait(self, proc: GatewayProcess, check: Callable[[], Any], what: str, timeout: float) -> Any:
        try:
            return wait_until(lambda: proc.popen.poll() is not None or check(), timeout, what)
        finally:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.popen.returncode}:\n{proc.output()[-3000:]}")

    def kserve(self, models: dict[str, Path], outputs: dict[str, str]) -> str:
        """KServe serving TorchScript ``models`` (name -> file); returns its gRPC address."""
        python = os.environ.get("MOAT_KSERVE_PYTHON", str(REPO / ".venv-kserve" / "bin" / "python"))
        if not Path(python).exists():
            raise RuntimeError(f"KServe's virtualenv is missing at {python}: run `make setup`")
        port = free_port()
        env = {"MOAT_BENCH_TORCH_SITE": sysconfig.get_paths()["purelib"],
               "MOAT_BENCH_MODELS": ",".join(f"{n}={p}" for n, p in models.items()),
               "MOAT_BENCH_OUTPUTS": ",".join(f"{n}={o}" for n, o in outputs.items()),
               "OMP_NUM_THREADS": "1"}
        proc = self._spawn("kserve", [python, str(REPO / "bench/kserve_demo.py"),
                                      "--grpc_port", str(port), "--http_port", str(free_port())], env)
        self._wait(proc, lambda: grpc_ready(f"127.0.0.1:{port}"), "KServe", 120)
        return f"127.0.0.1:{port}"

    def proxy(self, upstream: str) -> str:
        """The bare pass-through proxy in front of ``upstream``; returns its address."""
        proc = self._spawn("bare-proxy", [sys.executable, "-m", "bench.proxy", "--upstream", upstream])
        self.pids["bare-proxy"] = proc.popen.pid

        def serving() -> int | None:
            for line in proc.output().splitlines():
                if '"event": "serving"' in line:
                    return int(json.loads(line)["port"])
            return None

        port = self._wait(proc, serving, "the bare proxy", 60)
        return f"127.0.0.1:{port}"

    def gateway(self, name: str, config: Path, tree: Path = REPO) -> str:
        """``moat serve`` with ``config`` on free ports, running the code in ``tree`` (a checkout
        of moat: this one by default, or e.g. a ``git worktree`` of an older commit); returns its
        gRPC address."""
        proc = launch_gateway(config, self.workdir / f"{name}.log", timeout=600, cwd=tree)
        self._procs.append(proc)
        self.pids[name] = proc.popen.pid
        return proc.address

    def cpu_seconds(self, name: str) -> float | None:
        """CPU time (user + system, seconds) the contender's own process has used so far; None for
        one without a process of its own (``direct``) or where /proc is not there to read."""
        pid = self.pids.get(name)
        if pid is None:
            return None
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def redis(self) -> str:
        """A throwaway redis-server (no persistence) on a free port; returns its URL."""
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        port = free_port()
        proc = self._spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--dir", str(self.workdir)])
        self._wait(proc, lambda: redis_ready(port), "redis-server", 20)
        return f"redis://127.0.0.1:{port}/0"
