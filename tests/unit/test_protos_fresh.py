"""The committed generated code must be exactly what `make protos` produces from the sources."""

from pathlib import Path

import pytest

from protos.generate import PROTO_FILES, generate

PROTOS = Path(__file__).resolve().parents[2] / "protos"


@pytest.mark.parametrize("proto", PROTO_FILES)
@pytest.mark.parametrize("suffix", ["_pb2.py", "_pb2.pyi", "_pb2_grpc.py"])
def test_generated_code_is_fresh(tmp_path: Path, proto: str, suffix: str) -> None:
    generate(tmp_path)
    name = proto.removesuffix(".proto") + suffix
    fresh = (tmp_path / "protos" / name).read_text()
    committed = (PROTOS / name).read_text()
    assert committed == fresh, f"protos/{name} is stale: run `make protos` and commit the result"


def test_wire_contract_matches_open_inference_protocol() -> None:
    """Field numbers that tritonclient/KServe put on the wire (spot checks of the spec)."""
    from protos import inference_pb2 as pb

    request = pb.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert {n: request[n].number for n in ("model_name", "model_version", "id", "parameters", "inputs",
                                           "outputs", "raw_input_contents")} == {
        "model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5, "outputs": 6,
        "raw_input_contents": 7}
    response = pb.ModelInferResponse.DESCRIPTOR.fields_by_name
    assert response["outputs"].number == 5 and response["raw_output_contents"].number == 6
    contents = pb.InferTensorContents.DESCRIPTOR.fields_by_name
    assert [contents[n].number for n in ("bool_contents", "int_contents", "int64_contents", "uint_contents",
                                         "uint64_contents", "fp32_contents", "fp64_contents",
                                         "bytes_contents")] == list(range(1, 9))
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} >= {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                                 "ModelMetadata", "ModelInfer"}
