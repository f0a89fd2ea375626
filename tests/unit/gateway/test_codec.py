import numpy as np
import pytest

from gateway.codec import (
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from gateway.errors import InvalidArgument
from gateway.types import DATATYPES, InferRequest, InferResponse
from protos import inference_pb2 as pb

RNG = np.random.default_rng(0)


def _sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    dtype = DATATYPES[datatype]
    if dtype.kind == "b":
        return RNG.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return RNG.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return RNG.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_raw_roundtrip_keeps_dtype_shape_and_bytes(datatype: str) -> None:
    array = _sample(datatype)
    message = encode_request(InferRequest(model_name="m", inputs={"x": array}))
    decoded = decode_request(pb.ModelInferRequest.FromString(message.SerializeToString()))
    assert decoded.inputs["x"].dtype == DATATYPES[datatype]
    assert decoded.inputs["x"].shape == (2, 3)
    np.testing.assert_array_equal(decoded.inputs["x"], array)


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "FP16"])
def test_typed_contents_decode_like_raw(datatype: str) -> None:
    array = _sample(datatype)
    field = {"b": "bool_contents", "f": "fp64_contents" if datatype == "FP64" else "fp32_contents"}.get(
        array.dtype.kind)
    if field is None:
        field = {"INT64": "int64_contents", "UINT64": "uint64_contents"}.get(
            datatype, "int_contents" if array.dtype.kind == "i" else "uint_contents")
    message = pb.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name="x", datatype=datatype, shape=[2, 3])
    getattr(tensor.contents, field).extend(array.ravel().tolist())
    decoded = decode_request(message)
    np.testing.assert_array_equal(decoded.inputs["x"], array)
    assert decoded.inputs["x"].dtype == DATATYPES[datatype]


def test_fp16_must_be_raw() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="h", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidArgument, match="'h'.*FP16 must be sent in raw_input_contents"):
        decode_request(message)


def _raw_message(name: str, datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name=name, datatype=datatype, shape=shape)
    message.raw_input_contents.append(raw)
    return message


@pytest.mark.parametrize(
    ("message", "pattern"),
    [
        (_raw_message("img", "FP32", [2, 2], b"\0" * 15), r"'img': raw content has 15 bytes, .* needs 16"),
        (_raw_message("img", "FP8", [1], b"\0"), r"'img': datatype 'FP8' is not supported"),
        (_raw_message("img", "BYTES", [1], b"\0"), r"'img': datatype 'BYTES' is not supported"),
        (_raw_message("img", "FP32", [-1, 2], b""), r"'img': shape \[-1, 2\] has a negative dimension"),
        (_raw_message("img", "FP32", [1] * 65, b"\0" * 4), r"'img': 65 dimensions; at most 32 are accepted"),
        (_raw_message("img", "X" * 100_000, [1], b"\0"), r"'img': datatype of 100000 characters is not supported"),
        (_raw_message("i" * 100_000, "FP32", [1], b"\0" * 4), r"^the name of input 0 is longer than 256 characters$"),
    ],
)
def test_malformed_tensor_names_the_tensor(message: pb.ModelInferRequest, pattern: str) -> None:
    with pytest.raises(InvalidArgument, match=pattern):
        decode_request(message)


def test_typed_element_count_must_match_shape() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="v", datatype="INT64", shape=[3]).contents.int64_contents.extend([1, 2])
    with pytest.raises(InvalidArgument, match=r"'v': contents.int64_contents has 2 elements, .* needs 3"):
        decode_request(message)


def test_raw_and_typed_contents_cannot_mix() -> None:
    message = _raw_message("a", "FP32", [1], b"\0" * 4)
    message.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidArgument, match="'a': contents and raw_input_contents are both set"):
        decode_request(message)


def test_raw_entry_count_must_match_inputs() -> None:
    message = _raw_message("a", "FP32", [1], b"\0" * 4)
    message.inputs.add(name="b", datatype="FP32", shape=[1])
    with pytest.raises(InvalidArgument, match="raw_input_contents has 1 entries for 2 inputs"):
        decode_request(message)


def test_duplicate_input_names_rejected() -> None:
    message = _raw_message("a", "FP32", [1], b"\0" * 4)
    message.inputs.add(name="a", datatype="FP32", shape=[1])
    message.raw_input_contents.append(b"\0" * 4)
    with pytest.raises(InvalidArgument, match="'a' appears more than once"):
        decode_request(message)


def test_uint8_value_out_of_range_in_typed_contents() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="u", datatype="UINT8", shape=[1]).contents.uint_contents.append(300)
    with pytest.raises(InvalidArgument, match="'u'"):
        decode_request(message)


def test_response_roundtrip_and_request_fields() -> None:
    outputs = {"p": _sample("FP32", (4, 10)), "i": _sample("INT64", (4,))}
    message = encode_response(InferResponse(model_name="m", outputs=outputs, id="req-7"))
    assert message.id == "req-7" and [o.name for o in message.outputs] == ["p", "i"]
    assert list(message.outputs[0].shape) == [4, 10] and message.outputs[0].datatype == "FP32"
    decoded = decode_response(message)
    for name, array in outputs.items():
        np.testing.assert_array_equal(decoded.outputs[name], array)


def test_request_parameters_and_requested_outputs_are_decoded() -> None:
    message = _raw_message("a", "FP32", [1], b"\0" * 4)
    message.parameters["priority"].int64_param = 3
    message.outputs.add(name="p")
    decoded = decode_request(message)
    assert decoded.parameters == {"priority": 3}
    assert decoded.requested_outputs == ["p"]


def test_long_model_and_output_names_are_refused_without_being_echoed() -> None:
    """Issue 26: error messages stay short however long the caller's strings are."""
    message = _raw_message("img", "FP32", [1], b"\0" * 4)
    message.model_name = "m" * 1_000_000
    with pytest.raises(InvalidArgument, match=r"^model_name is longer than 256 characters$"):
        decode_request(message)
    message = _raw_message("img", "FP32", [1], b"\0" * 4)
    message.model_version = "9" * 300
    with pytest.raises(InvalidArgument, match=r"^model_version is longer than 256 characters$"):
        decode_request(message)
    message = _raw_message("img", "FP32", [1], b"\0" * 4)
    message.outputs.add(name="o" * 257)
    with pytest.raises(InvalidArgument, match=r"^the name of output 0 is longer than 256 characters$"):
        decode_request(message)
