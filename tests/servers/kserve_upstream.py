"""A real KServe ModelServer used as the upstream in integration tests.

Run in KServe's own virtualenv (kserve pins grpcio/protobuf versions of its own):
``python kserve_upstream.py --grpc_port N --http_port M``. It parses ``sys.argv`` at import and
owns its event loop, so it always runs as a subprocess, never inside pytest.

Models:
- ``tiny-classifier``: FP32 [-1, 4] -> softmax of a fixed linear map, FP32 [-1, 3].
- ``mixed``: FP16 ``half`` [-1, 2], UINT8 ``byte`` [-1, 2], INT64 ``long`` [-1, 2] -> each doubled,
  plus FP32 ``total`` [-1]: the row sums, to show every datatype crossing the gateway.
- ``spy``: FP32 ``x`` [-1, 1] -> INT64 ``credentials_seen`` [-1]: how many credential headers
  (authorization, x-api-key) reached this server; the gateway must forward none.
- ``slow``: FP32 ``seconds`` [1] -> the same after sleeping that long (deadline propagation).
- ``batch-echo``: FP32 ``x`` [-1, 2] -> FP32 ``tripled`` [-1, 2] and INT64 ``call_rows`` [-1]: the
  rows of the call each row came in, after 50 ms (so concurrent calls queue at a batching gateway).
- ``first-row``: declares FP32 ``x`` [-1, 2] -> ``y`` [-1, 2] but answers only the first row, as a
  model that does not batch would (the gateway must say so, not split rows that are not there).
"""

from __future__ import annotations

import asyncio

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

WEIGHTS = np.array([[1.0, -2.0, 0.5], [0.3, 0.8, -1.0], [-0.7, 0.1, 2.0], [1.5, 0.0, -0.5]], np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


def _output(name: str, array: np.ndarray, datatype: str) -> InferOutput:
    out = InferOutput(name=name, shape=list(array.shape), datatype=datatype)
    out.set_data_from_numpy(array, binary_data=True)
    return out


class TinyClassifier(Model):
    def __init__(self) -> None:
        super().__init__("tiny-classifier")
        self.ready = True

    def get_input_types(self) -> list[dict]:
        return [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]

    async def predict(self, payload: InferRequest, headers: dict | None = None, response_headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32)
        probabilities = _softmax(x @ WEIGHTS)
        return InferResponse(model_name=self.name, infer_outputs=[_output("probabilities", probabilities, "FP32")],
                             response_id=payload.id)


class Mixed(Model):
    def __init__(self) -> None:
        super().__init__("mixed")
        self.ready = True

    def get_input_types(self) -> list[dict]:
        return [{"name": "half", "datatype": "FP16", "shape": [-1, 2]},
                {"name": "byte", "datatype": "UINT8", "shape": [-1, 2]},
                {"name": "long", "datatype": "INT64", "shape": [-1, 2]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "half2", "datatype": "FP16", "shape": [-1, 2]},
                {"name": "byte2", "datatype": "UINT8", "shape": [-1, 2]},
                {"name": "long2", "datatype": "INT64", "shape": [-1, 2]},
                {"name": "total", "datatype": "FP32", "shape": [-1]}]

    async def predict(self, payload: InferRequest, headers: dict | None = None, response_headers=None) -> InferResponse:
        arrays = {i.name: i.as_numpy() for i in payload.inputs}
        half, byte, long = arrays["half"], arrays["byte"], arrays["long"]
        total = (half.astype(np.float32).sum(1) + byte.astype(np.float32).sum(1) + long.astype(np.float32).sum(1))
        outputs = [_output("half2", (half * 2).astype(np.float16), "FP16"),
                   _output("byte2", (byte * 2).astype(np.uint8), "UINT8"),
                   _output("long2", (long * 2).astype(np.int64), "INT64"),
                   _output("total", total.astype(np.float32), "FP32")]
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id)


class Spy(Model):
    def __init__(self) -> None:
        super().__init__("spy")
        self.ready = True

    def get_input_types(self) -> list[dict]:
        return [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "credentials_seen", "datatype": "INT64", "shape": [-1]}]

    async def predict(self, payload: InferRequest, headers: dict | None = None, response_headers=None) -> InferResponse:
        seen = sum(1 for name in (headers or {}) if name.lower() in ("authorization", "x-api-key"))
        batch = payload.inputs[0].as_numpy().shape[0]
        counts = np.full((batch,), seen, dtype=np.int64)
        return InferResponse(model_name=self.name, infer_outputs=[_output("credentials_seen", counts, "INT64")],
                             response_id=payload.id)


class Slow(Model):
    def __init__(self) -> None:
        super().__init__("slow")
        self.ready = True

    def get_input_types(self) -> list[dict]:
        return [{"name": "seconds", "datatype": "FP32", "shape": [1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "seconds", "datatype": "FP32", "shape": [1]}]

    async def predict(self, payload: InferRequest, headers: dict | None = None, response_headers=None) -> InferResponse:
        seconds = payload.inputs[0].as_numpy().astype(np.float32)
        await asyncio.sleep(float(seconds[0]))
        return InferResponse(model_name=self.name, infer_outputs=[_output("seconds", seconds, "FP32")],
                             response_id=payload.id)


class BatchEcho(Model):
    def __init__(self, name: str = "batch-echo") -> None:
        super().__init__(name)
        self.ready = True

    def get_input_types(self) -> list[dict]:
        return [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "tripled", "datatype": "FP32", "shape": [-1, 2]},
                {"name": "call_rows", "datatype": "INT64", "shape": [-1]}]

    async def predict(self, payload: InferRequest, headers: dict | None = None, response_headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32)
        await asyncio.sleep(0.05)
        outputs = [_output("tripled", x * 3, "FP32"), _output("call_rows", np.full(len(x), len(x), np.int64), "INT64")]
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id)


class FirstRow(BatchEcho):
    def __init__(self) -> None:
        super().__init__("first-row")

    def get_output_types(self) -> list[dict]:
        return [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]

    async def predict(self, payload: InferRequest, headers: dict | None = None, response_headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32)
        await asyncio.sleep(0.05)
        return InferResponse(model_name=self.name, infer_outputs=[_output("y", x[:1], "FP32")], response_id=payload.id)


if __name__ == "__main__":
    ModelServer(workers=1).start([TinyClassifier(), Mixed(), Spy(), Slow(), BatchEcho(), FirstRow()])
