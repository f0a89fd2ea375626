"""Open Inference Protocol tensors <-> numpy arrays.

Decoding checks that each tensor is well formed on its own terms (known datatype, non-negative
shape, byte or element count matching the shape); whether it fits the model is the data plane's
check. Answers always travel as little-endian ``raw_output_contents``, as Triton sends them.
"""

from __future__ import annotations

import math

import numpy as np

from gateway.errors import InvalidArgument
from gateway.types import (
    DATATYPES,
    MAX_NAME_CHARS,
    InferRequest,
    InferResponse,
    ModelMetadata,
    TensorSpec,
    datatype_of,
)
from protos import inference_pb2 as pb

# Which typed-contents field carries each datatype. FP16 has none: the spec allows it raw only.
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


# numpy cannot hold more than 64 dimensions, and no image model takes more than a few.
MAX_DIMS = 32


def _checked_name(what: str, value: str) -> str:
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(f"{what} is longer than {MAX_NAME_CHARS} characters")
    return value


def _checked_shape(name: str, shape: list[int]) -> tuple[int, ...]:
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(f"input '{name}': {len(shape)} dimensions; at most {MAX_DIMS} are accepted")
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(f"input '{name}': shape {list(shape)} has a negative dimension")
    return tuple(int(dim) for dim in shape)


def _checked_datatype(name: str, datatype: str) -> np.dtype:
    try:
        return DATATYPES[datatype]
    except KeyError:
        valid = ", ".join(DATATYPES)
        shown = f"'{datatype}'" if len(datatype) <= 16 else f"of {len(datatype)} characters"
        raise InvalidArgument(f"input '{name}': datatype {shown} is not supported; valid: {valid}") from None


def _from_raw(name: str, raw: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"input '{name}': raw content has {len(raw)} bytes, "
            f"shape {list(shape)} of {dtype.name} needs {expected}"
        )
    # A view over the message's bytes: no copy. Read-only, which callers must respect.
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _from_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, datatype: str, dtype: np.dtype,
    shape: tuple[int, ...],
) -> np.ndarray:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(
            f"input '{tensor.name}': datatype {datatype} must be sent in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    expected = math.prod(shape)
    if len(values) != expected:
        raise InvalidArgument(
            f"input '{tensor.name}': contents.{field} has {len(values)} elements, "
            f"shape {list(shape)} needs {expected}"
        )
    try:
        array = np.asarray(values, dtype=dtype)
    except OverflowError:
        raise InvalidArgument(f"input '{tensor.name}': a value is out of range for {datatype}") from None
    return array.reshape(shape)


def decode_request(message: pb.ModelInferRequest) -> InferRequest:
    """Decode a ``ModelInferRequest`` into arrays; ``InvalidArgument`` names the bad tensor."""
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs"
        )
    _checked_name("model_name", message.model_name)
    _checked_name("model_version", message.model_version)
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        _checked_name(f"the name of input {index}", tensor.name)
        if tensor.name in inputs:
            raise InvalidArgument(f"input '{tensor.name}' appears more than once")
        dtype = _checked_datatype(tensor.name, tensor.datatype)
        shape = _checked_shape(tensor.name, list(tensor.shape))
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"input '{tensor.name}': contents and raw_input_contents are both set"
                )
            inputs[tensor.name] = _from_raw(tensor.name, raw[index], dtype, shape)
        else:
            inputs[tensor.name] = _from_contents(tensor, tensor.datatype, dtype, shape)
    requested = [_checked_name(f"the name of output {i}", output.name) for i, output in enumerate(message.outputs)]
    return InferRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=inputs,
        requested_outputs=requested or None,
        parameters=_decode_parameters(message.parameters),
    )


def _decode_parameters(parameters: object) -> dict[str, bool | int | float | str]:
    decoded: dict[str, bool | int | float | str] = {}
    for key, value in parameters.items():  # type: ignore[attr-defined]
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            decoded[key] = getattr(value, choice)
    return decoded


def encode_request(request: InferRequest) -> pb.ModelInferRequest:
    """Encode arrays as a raw-content ``ModelInferRequest`` (what the upstream backend sends)."""
    message = pb.ModelInferRequest(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    for name, array in request.inputs.items():
        message.inputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        message.raw_input_contents.append(_to_raw(array))
    for name in request.requested_outputs or ():
        message.outputs.add(name=name)
    return message


def encode_response(response: InferResponse) -> pb.ModelInferResponse:
    """Encode output arrays as a raw-content ``ModelInferResponse``."""
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for name, array in response.outputs.items():
        message.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        message.raw_output_contents.append(_to_raw(array))
    return message


def decode_response(message: pb.ModelInferResponse) -> InferResponse:
    """Decode an upstream ``ModelInferResponse`` (raw or typed contents) into arrays."""
    raw = message.raw_output_contents
    outputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.outputs):
        dtype = _checked_datatype(tensor.name, tensor.datatype)
        shape = _checked_shape(tensor.name, list(tensor.shape))
        if index < len(raw):
            outputs[tensor.name] = _from_raw(tensor.name, raw[index], dtype, shape)
        else:
            outputs[tensor.name] = _from_contents(tensor, tensor.datatype, dtype, shape)  # type: ignore[arg-type]
    return InferResponse(
        model_name=message.model_name, model_version=message.model_version, id=message.id,
        outputs=outputs,
    )


def _to_raw(array: np.ndarray) -> bytes:
    dtype = DATATYPES[datatype_of(array)]
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def encode_metadata(metadata: ModelMetadata) -> pb.ModelMetadataResponse:
    """Encode a model's declared tensors as a ``ModelMetadataResponse``."""
    message = pb.ModelMetadataResponse(
        name=metadata.name, platform=metadata.platform, versions=list(metadata.versions)
    )
    for spec in metadata.inputs:
        message.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
    for spec in metadata.outputs:
        message.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
    return message


def decode_metadata(message: pb.ModelMetadataResponse) -> ModelMetadata:
    """Decode an upstream ``ModelMetadataResponse``."""

    def specs(tensors: object) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(t.name, t.datatype, tuple(int(d) for d in t.shape))
            for t in tensors  # type: ignore[attr-defined]
        )

    return ModelMetadata(
        name=message.name, inputs=specs(message.inputs), outputs=specs(message.outputs),
        platform=message.platform, versions=tuple(message.versions),
    )
