"""The ``embedded`` backend: a PyTorch model run in-process (CUDA when present, else CPU).

The model comes from exactly one model source in the params (:mod:`gateway.backends.sources`):
``torchscript: PATH``, ``timm: {arch, checkpoint, ...}``, or one a package declares by entry
point, such as the evaluation suite's ``zoo: NAME`` (a victim trained and cached on first use).
Its metadata (input and output tensors) comes from the config.

Concurrent requests are batched (:mod:`gateway.backends.batching`) when every declared tensor is
batch-major (first dimension -1): ``max_batch_delay_ms`` (default 0: only requests that queued
while the model was busy join a batch, so a lone request waits for nothing) and ``max_batch_rows``
(default 256) bound how long a batch may wait to fill and how many rows it holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from gateway.backends.base import BACKENDS, check_params, parse_tensor_specs
from gateway.backends.batching import DynamicBatcher, batching_params, on_executor
from gateway.backends.sources import MODEL_SOURCES, load_model
from gateway.config import ConfigError
from gateway.errors import DeadlineExceeded
from gateway.types import InferRequest, InferResponse, ModelMetadata

try:
    import torch
except ImportError:  # the proxy-only image has no torch
    torch = None  # type: ignore[assignment]

_OWN_PARAMS = frozenset({"device", "inputs", "outputs", "max_batch_rows", "max_batch_delay_ms"})
DEFAULT_MAX_BATCH_ROWS = 256


def _resolve_device(requested: str, where: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested not in ("cpu", "cuda"):
        raise ConfigError(where, f"must be auto, cpu or cuda, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(where, "cuda was asked for but no CUDA device is available")
    return requested


class EmbeddedBackend:
    """Runs a torch module on a dedicated worker thread so the event loop never blocks."""

    def __init__(self, name: str, model: Any, metadata: ModelMetadata, device: str, *,
                 max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS, max_batch_delay: float = 0.0,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.name = name
        self._model = model.to(device).eval()
        self._metadata = metadata
        self._device = device
        # One worker: the model saturates the cores itself; more threads only contend.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embedded-{name}")
        batch_major = all(spec.shape[0] == -1 for spec in (*metadata.inputs, *metadata.outputs))
        self.batcher = DynamicBatcher(on_executor(self._run_batch, self._executor), max_rows=max_batch_rows,
                                      max_delay=max_batch_delay, on_batch=on_batch) if batch_major else None

    async def start(self) -> None:
        return None

    async def metadata(self) -> ModelMetadata:
        return self._metadata

    async def ready(self) -> bool:
        return True

    async def infer(self, request: InferRequest, deadline: float | None, *,
                    while_waiting: Callable[[], None] | None = None) -> InferResponse:
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline expired before the model ran")
        arrays = [request.inputs[spec.name] for spec in self._metadata.inputs]
        if self.batcher is not None:
            values = await self.batcher.submit("forward", arrays, deadline, while_waiting=while_waiting)
            outputs = {spec.name: value for spec, value in zip(self._metadata.outputs, values, strict=True)}
        else:
            running = asyncio.get_running_loop().run_in_executor(self._executor, self._run, arrays)
            if while_waiting is not None:  # the model runs on the worker thread meanwhile
                while_waiting()
            outputs = await running
        return InferResponse(model_name=self.name, outputs=outputs, id=request.id)

    async def features(self, inputs: np.ndarray) -> np.ndarray | None:
        """The model's ``features(x)`` (float32 [B, F], e.g. penultimate activations) if it has one."""
        if not hasattr(self._model, "features"):
            return None
        if self.batcher is not None:
            return (await self.batcher.submit("features", [inputs]))[0]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._features, inputs)

    def _features(self, inputs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            tensor = torch.tensor(inputs, device=self._device).float()
            return self._model.features(tensor).detach().cpu().numpy().astype(np.float32, copy=False)

    def _run_batch(self, method: Hashable, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """One batch on the worker thread: outputs in declared order (``features``: one array)."""
        if method == "features":
            return [self._features(arrays[0])]
        outputs = self._run(arrays)
        return [outputs[spec.name] for spec in self._metadata.outputs]

    def _run(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        tensors = []
        for array in arrays:
            tensor = torch.tensor(array, device=self._device)  # copies: request bytes are read-only
            tensors.append(tensor.float() if tensor.is_floating_point() else tensor)
        with torch.inference_mode():
            result = self._model(*tensors)
        if isinstance(result, Mapping):
            result = [result[spec.name] for spec in self._metadata.outputs]
        elif not isinstance(result, (tuple, list)):
            result = [result]
        return {
            spec.name: value.detach().cpu().numpy().astype(spec.dtype, copy=False)
            for spec, value in zip(self._metadata.outputs, result, strict=True)
        }

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        self._executor.shutdown(wait=True)


@BACKENDS.register("embedded")
def create_embedded(name: str, params: Mapping[str, Any], where: str, *,
                    on_batch: Callable[[int], None] | None = None, **_: Any) -> EmbeddedBackend:
    """Build an embedded backend from ``params`` (see the module docstring)."""
    if torch is None:
        raise ConfigError(f"{where}", "the embedded backend needs torch: pip install 'moat[models]'")
    check_params(params, where, {*_OWN_PARAMS, *MODEL_SOURCES.names()}, {"inputs", "outputs"})
    rows, delay = batching_params(params, where, DEFAULT_MAX_BATCH_ROWS)
    metadata = ModelMetadata(
        name=name,
        inputs=parse_tensor_specs(params["inputs"], f"{where}.inputs"),
        outputs=parse_tensor_specs(params["outputs"], f"{where}.outputs"),
        platform="pytorch",
        versions=("1",),
    )
    device = _resolve_device(str(params.get("device", "auto")), f"{where}.device")
    return EmbeddedBackend(name, load_model(params, where, ignore=_OWN_PARAMS), metadata, device,
                           max_batch_rows=rows, max_batch_delay=delay, on_batch=on_batch)
