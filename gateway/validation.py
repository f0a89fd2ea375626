"""Checks that a decoded request fits the model it names: tensors, datatypes, shapes, batch."""

from __future__ import annotations

import numpy as np

from gateway.errors import InvalidArgument
from gateway.types import InferRequest, ModelMetadata, TensorSpec, datatype_of


def _shape_fits(shape: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    return len(shape) == len(declared) and all(d == -1 or d == s for s, d in zip(shape, declared, strict=True))


def _check_tensor(name: str, array: np.ndarray, spec: TensorSpec, max_batch_size: int) -> None:
    if array.dtype != spec.dtype:
        got = datatype_of(array)
        raise InvalidArgument(
            f"input '{name}': datatype {got} does not match the model's {spec.datatype}"
        )
    if not _shape_fits(array.shape, spec.shape):
        raise InvalidArgument(
            f"input '{name}': shape {list(array.shape)} does not match the model's {list(spec.shape)}"
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # A NaN compares false with everything: one such image would silently poison a detector's
        # state (PRADA's distances) and reach the model; no image model is asked a non-number.
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise InvalidArgument(f"input '{name}': {bad} values are NaN or infinite; only finite numbers are accepted")
    if spec.shape and spec.shape[0] == -1:
        batch = array.shape[0]
        if batch < 1:
            raise InvalidArgument(f"input '{name}': batch dimension must be at least 1")
        if batch > max_batch_size:
            raise InvalidArgument(
                f"input '{name}': batch of {batch} exceeds max_batch_size {max_batch_size}"
            )


def validate_request(request: InferRequest, metadata: ModelMetadata, max_batch_size: int) -> None:
    """Raise ``InvalidArgument`` naming the tensor unless ``request`` fits ``metadata``."""
    declared = {spec.name: spec for spec in metadata.inputs}
    for name in request.inputs:
        if name not in declared:
            raise InvalidArgument(
                f"unexpected input '{name}'; model '{metadata.name}' takes: {', '.join(declared)}"
            )
    batches = set()
    for name, spec in declared.items():
        if name not in request.inputs:
            raise InvalidArgument(f"missing input '{name}' for model '{metadata.name}'")
        array = request.inputs[name]
        _check_tensor(name, array, spec, max_batch_size)
        if spec.shape and spec.shape[0] == -1:
            batches.add(array.shape[0])
    if len(batches) > 1:
        raise InvalidArgument(f"inputs disagree on the batch size: {sorted(batches)}")
    outputs = {spec.name for spec in metadata.outputs}
    for name in request.requested_outputs or ():
        if name not in outputs:
            raise InvalidArgument(
                f"unknown output '{name}'; model '{metadata.name}' produces: {', '.join(sorted(outputs))}"
            )

