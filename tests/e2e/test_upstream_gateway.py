"""moat in front of a real KServe server: same answers as direct, UNAVAILABLE while it is down,
and recovery once it is back, all through the stock tritonclient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import ALICE, client, infer_input
from tests.servers.procs import REPO, Proc, start_gateway, start_kserve, wait_until


def _config(path: Path, upstream_port: int) -> Path:
    models = [{"name": name, "kind": "classifier",
               "backend": {"name": "upstream", "params": {"address": f"127.0.0.1:{upstream_port}"}}}
              for name in ("tiny-classifier", "mixed")]
    path.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1"},
        "auth": {"keys_file": str(REPO / "deploy/configs/demo-keys.yaml")},
        "models": models,
    }))
    return path


def _tiny_inputs() -> list[triton.InferInput]:
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    return [infer_input("x", x, "FP32")]


def _mixed_inputs() -> list[triton.InferInput]:
    return [infer_input("half", np.array([[0.25, -1.5], [3.0, 7.5]], np.float16), "FP16"),
            infer_input("byte", np.array([[0, 127], [128, 255]], np.uint8), "UINT8"),
            infer_input("long", np.array([[-(2**62), 1], [2**40, 0]], np.int64), "INT64")]


@pytest.fixture
def stack(tmp_path: Path):
    kserve = start_kserve(tmp_path)
    gateway = start_gateway(_config(tmp_path / "upstream.yaml", kserve.info["grpc_port"]), tmp_path)
    yield kserve, gateway
    assert gateway.stop() == 0
    kserve.stop()


def test_answers_through_the_gateway_equal_direct_answers(stack: tuple[Proc, Proc]) -> None:
    kserve, gateway = stack
    direct = triton.InferenceServerClient(f"127.0.0.1:{kserve.info['grpc_port']}")
    proxied = client(gateway)
    for model, inputs, outputs in (("tiny-classifier", _tiny_inputs, ["probabilities"]),
                                   ("mixed", _mixed_inputs, ["half2", "byte2", "long2", "total"])):
        want = direct.infer(model, inputs())
        got = proxied.infer(model, inputs(), headers=ALICE)
        for name in outputs:
            assert got.as_numpy(name).dtype == want.as_numpy(name).dtype
            assert got.as_numpy(name).tobytes() == want.as_numpy(name).tobytes(), name
    assert proxied.get_model_metadata("mixed", headers=ALICE).inputs == direct.get_model_metadata("mixed").inputs


def test_upstream_down_is_unavailable_and_recovery_follows_restart(stack: tuple[Proc, Proc], tmp_path: Path) -> None:
    kserve, gateway = stack
    proxied = client(gateway)
    want = proxied.infer("tiny-classifier", _tiny_inputs(), headers=ALICE).as_numpy("probabilities")
    kserve.stop()
    for _ in range(3):
        with pytest.raises(InferenceServerException) as caught:
            proxied.infer("tiny-classifier", _tiny_inputs(), headers=ALICE)
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
    assert proxied.is_server_live(headers=ALICE)
    assert not proxied.is_model_ready("tiny-classifier", headers=ALICE)
    restarted = start_kserve(tmp_path, grpc_port=kserve.info["grpc_port"])
    try:
        def answered() -> np.ndarray | None:
            try:
                return proxied.infer("tiny-classifier", _tiny_inputs(), headers=ALICE).as_numpy("probabilities")
            except InferenceServerException:
                return None

        got = wait_until(answered, 20, "the gateway to reach the restarted upstream", interval=0.2)
        np.testing.assert_array_equal(got, want)
    finally:
        restarted.stop()
