"""The ``embedded`` backend: a PyTorch model run in-process (CUDA when present, else CPU).

The model comes from exactly one source in the params:
``zoo: NAME`` (a victim from :mod:`evaluation.zoo`, trained and cached on first use),
``torchscript: PATH``, or ``timm: {arch, checkpoint, num_classes, softmax, kwargs}``
(a timm architecture built without pretrained weights, then loaded from a local state dict).
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
from pathlib import Path
from typing import Any

import numpy as np

from gateway.backends.base import BACKENDS, check_params, parse_tensor_specs
from gateway.backends.batching import DynamicBatcher, batching_params, on_executor
from gateway.config import ConfigError
from gateway.errors import DeadlineExceeded
from gateway.types import InferRequest, InferResponse, ModelMetadata

try:
    import torch
except ImportError:  # the proxy-only image has no torch
    torch = None  # type: ignore[assignment]

_SOURCES = ("zoo", "torchscript", "timm")
DEFAULT_MAX_BATCH_ROWS = 256


def _resolve_device(requested: str, where: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested not in ("cpu", "cuda"):
        raise ConfigError(where, f"must be auto, cpu or cuda, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(where, "cuda was asked for but no CUDA device is available")
    return requested


def _load_timm(spec: Any, where: str) -> Any:
    import timm

    if not isinstance(spec, Mapping) or "arch" not in spec or "checkpoint" not in spec:
        raise ConfigError(where, "must be a mapping with arch and checkpoint (a local state dict)")
    try:
        model = timm.create_model(
            spec["arch"], pretrained=False, num_classes=spec.get("num_classes", 1000),
            **dict(spec.get("kwargs", {})),
        )
        state = torch.load(Path(spec["checkpoint"]), map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
    except Exception as error:  # noqa: BLE001 - any load failure is a config problem
        raise ConfigError(where, f"cannot build timm model: {error}") from None
    if spec.get("softmax", False):
        model = torch.nn.Sequential(model, torch.nn.Softmax(dim=-1))
    return model


def _load_model(params: Mapping[str, Any], where: str) -> Any:
    given = [source for source in _SOURCES if source in params]
    if len(given) != 1:
        raise ConfigError(where, f"needs exactly one model source of {', '.join(_SOURCES)}, got {given or 'none'}")
    source = given[0]
    field = f"{where}.{source}"
    if source == "timm":
        return _load_timm(params["timm"], field)
    if source == "zoo":
        from evaluation import zoo

        try:
            path = zoo.zoo_path(params["zoo"])
        except ValueError as error:
            raise ConfigError(field, str(error)) from None
    else:
        path = Path(params["torchscript"])
        if not path.is_file():
            raise ConfigError(field, f"file {str(path)!r} does not exist")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # noqa: BLE001
        raise ConfigError(field, f"cannot load TorchScript file {str(path)!r}: {error}") from None


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
    check_params(params, where, {*_SOURCES, "device", "inputs", "outputs", "max_batch_rows", "max_batch_delay_ms"},
                 {"inputs", "outputs"})
    rows, delay = batching_params(params, where, DEFAULT_MAX_BATCH_ROWS)
    metadata = ModelMetadata(
        name=name,
        inputs=parse_tensor_specs(params["inputs"], f"{where}.inputs"),
        outputs=parse_tensor_specs(params["outputs"], f"{where}.outputs"),
        platform="pytorch",
        versions=("1",),
    )
    device = _resolve_device(str(params.get("device", "auto")), f"{where}.device")
    return EmbeddedBackend(name, _load_model(params, where), metadata, device,
                           max_batch_rows=rows, max_batch_delay=delay, on_batch=on_batch)
