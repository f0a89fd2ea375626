import numpy as np
import pytest

from gateway.errors import InvalidArgument
from gateway.types import InferRequest, ModelMetadata, TensorSpec
from gateway.validation import validate_request

META = ModelMetadata(
    name="clf",
    inputs=(TensorSpec("input", "FP32", (-1, 1, 28, 28)), TensorSpec("mask", "UINT8", (-1, 4))),
    outputs=(TensorSpec("probabilities", "FP32", (-1, 10)),),
)


def _request(**changes) -> InferRequest:
    inputs = {"input": np.zeros((2, 1, 28, 28), np.float32), "mask": np.zeros((2, 4), np.uint8)}
    inputs.update(changes.pop("inputs", {}))
    for name in changes.pop("drop", ()):
        inputs.pop(name)
    return InferRequest(model_name="clf", inputs=inputs, **changes)


def test_fitting_request_passes() -> None:
    validate_request(_request(), META, max_batch_size=8)


@pytest.mark.parametrize(
    ("request_", "pattern"),
    [
        (_request(drop=["mask"]), "missing input 'mask' for model 'clf'"),
        (_request(inputs={"extra": np.zeros((2,), np.float32)}), "unexpected input 'extra'; model 'clf' takes: input, mask"),
        (_request(inputs={"input": np.zeros((2, 1, 28, 28), np.float64)}), "input 'input': datatype FP64 does not match the model's FP32"),
        (_request(inputs={"input": np.zeros((2, 28, 28), np.float32)}), r"input 'input': shape \[2, 28, 28\] does not match the model's \[-1, 1, 28, 28\]"),
        (_request(inputs={"input": np.zeros((2, 1, 28, 27), np.float32)}), r"input 'input': shape \[2, 1, 28, 27\]"),
        (_request(inputs={"input": np.zeros((9, 1, 28, 28), np.float32), "mask": np.zeros((9, 4), np.uint8)}), "input 'input': batch of 9 exceeds max_batch_size 8"),
        (_request(inputs={"input": np.zeros((0, 1, 28, 28), np.float32), "mask": np.zeros((0, 4), np.uint8)}), "input 'input': batch dimension must be at least 1"),
        (_request(inputs={"mask": np.zeros((3, 4), np.uint8)}), r"inputs disagree on the batch size: \[2, 3\]"),
        (_request(requested_outputs=["logits"]), "unknown output 'logits'; model 'clf' produces: probabilities"),
        (_request(inputs={"input": np.full((2, 1, 28, 28), np.nan, np.float32)}),
         "input 'input': 1568 values are NaN or infinite; only finite numbers are accepted"),
        (_request(inputs={"input": np.pad(np.full((2, 1, 28, 27), 0.5, np.float32), ((0, 0), (0, 0), (0, 0), (0, 1)),
                                          constant_values=np.inf)}),
         "input 'input': 56 values are NaN or infinite"),
    ],
)
def test_mismatch_names_tensor_and_problem(request_: InferRequest, pattern: str) -> None:
    with pytest.raises(InvalidArgument, match=pattern):
        validate_request(request_, META, max_batch_size=8)
