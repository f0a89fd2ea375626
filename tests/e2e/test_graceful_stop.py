"""SIGTERM during a burst: every request completes or fails with a clean status; exit code 0."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import ALICE, DEMO_CONFIG, infer_input, write_config
from tests.servers.procs import start_gateway

# What a client may see from a server that is draining or gone: nothing half-done, no INTERNAL.
CLEAN_FAILURES = {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}


def test_sigterm_during_a_burst_drains_cleanly(tmp_path) -> None:
    proc = start_gateway(write_config(tmp_path / "demo.yaml", DEMO_CONFIG, grace_seconds=5), tmp_path)
    address = f"127.0.0.1:{proc.info['grpc']}"
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + 4.0
    images = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)

    def hammer() -> None:
        c = triton.InferenceServerClient(address)
        while time.monotonic() < stop_at:
            try:
                result = c.infer("fashion-classifier", [infer_input("input", images, "FP32")], headers=ALICE,
                                 client_timeout=10)
                assert result.as_numpy("probabilities").shape == (32, 10)
                outcome = "OK"
            except InferenceServerException as error:
                outcome = str(error.status())
            with lock:
                outcomes[outcome] += 1
            if outcome != "OK":
                time.sleep(0.05)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    proc.popen.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=30)
    code = proc.stop(timeout=30)
    assert code == 0, proc.output()[-2000:]
    assert outcomes["OK"] > 0, outcomes
    assert set(outcomes) - {"OK"} <= CLEAN_FAILURES, outcomes
    assert '"event": "stopped"' in proc.output()
