"""The demo models on a real KServe ModelServer: the "direct" contender of ``moat bench overhead``.

Runs in KServe's own virtualenv (``.venv-kserve``), which has no torch: the bench passes the main
virtualenv's site-packages in ``MOAT_BENCH_TORCH_SITE`` and it is appended (lowest priority) to
``sys.path``, so KServe keeps its own grpcio/protobuf and only torch comes from there. The
TorchScript files come in ``MOAT_BENCH_MODELS`` as ``name=path,name=path``; each model serves
input ``input`` FP32 [-1, 1, 28, 28] and one FP32 output named by ``MOAT_BENCH_OUTPUTS``
(``name=output,...``). Started as
``python kserve_demo.py --grpc_port N --http_port M`` (KServe parses ``sys.argv`` itself).
"""

from __future__ import annotations

import os
import sys

if os.environ.get("MOAT_BENCH_TORCH_SITE"):
    sys.path.append(os.environ["MOAT_BENCH_TORCH_SITE"])

import numpy as np  # noqa: E402
import torch  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer  # noqa: E402

torch.set_num_threads(1)


def _pairs(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item)


class TorchScriptModel(Model):
    """A TorchScript module: float32 [B, 1, 28, 28] -> float32 [B, K] under output ``output``."""

    def __init__(self, name: str, path: str, output: str) -> None:
        super().__init__(name)
        self._module = torch.jit.load(path, map_location="cpu").eval()
        self._output = output
        with torch.inference_mode():
            self._width = int(self._module(torch.zeros(1, 1, 28, 28)).shape[1])
        self.ready = True

    def get_input_types(self) -> list[dict]:
        return [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": self._output, "datatype": "FP32", "shape": [-1, self._width]}]

    async def predict(self, payload: InferRequest, headers: dict | None = None, response_headers=None) -> InferResponse:
        x = torch.from_numpy(np.array(payload.inputs[0].as_numpy(), dtype=np.float32))
        with torch.inference_mode():
            y = self._module(x).numpy().astype(np.float32, copy=False)
        out = InferOutput(name=self._output, shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=True)
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id)


if __name__ == "__main__":
    outputs = _pairs(os.environ.get("MOAT_BENCH_OUTPUTS", ""))
    models = [TorchScriptModel(name, path, outputs.get(name, "output"))
              for name, path in _pairs(os.environ["MOAT_BENCH_MODELS"]).items()]
    ModelServer(workers=1).start(models)
