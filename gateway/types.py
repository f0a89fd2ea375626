"""Protocol-independent request, response and metadata types of the data plane."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: The longest model, version, tensor name a request may carry: names appear in error messages,
#: which stay short however long a caller's message is.
MAX_NAME_CHARS = 256

# Open Inference Protocol datatype -> little-endian numpy dtype. BYTES and BF16 are not served:
# image models take numeric tensors, and numpy has no bfloat16.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


def datatype_of(array: np.ndarray) -> str:
    """The protocol datatype name of ``array``'s dtype; ``ValueError`` if it has none."""
    for name, dtype in DATATYPES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            return name
    raise ValueError(f"dtype {array.dtype} has no Open Inference Protocol datatype")


@dataclass(frozen=True)
class TensorSpec:
    """A declared tensor: name, protocol datatype and shape (-1 for a variable dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return DATATYPES[self.datatype]


@dataclass(frozen=True)
class ModelMetadata:
    """What a model declares: its tensors, platform and versions."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    platform: str = ""
    versions: tuple[str, ...] = ()


@dataclass
class InferRequest:
    """A decoded inference request.

    Attributes:
        model_name: the model asked for.
        inputs: tensor name -> array, in request order; dtype and shape as the client sent.
        requested_outputs: output names asked for, or None for all.
    """

    model_name: str
    inputs: dict[str, np.ndarray]
    model_version: str = ""
    id: str = ""
    requested_outputs: list[str] | None = None
    parameters: dict[str, bool | int | float | str] = field(default_factory=dict)


@dataclass
class InferResponse:
    """An answer: output name -> array, in declared output order."""

    model_name: str
    outputs: dict[str, np.ndarray]
    model_version: str = ""
    id: str = ""
