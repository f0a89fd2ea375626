"""The Open Inference Protocol servicer: decode, call the data plane, encode. Nothing else."""

from __future__ import annotations

import time

import grpc

from gateway import __version__
from gateway.auth import KeyStore
from gateway.codec import decode_request, encode_metadata, encode_response
from gateway.pipeline import DataPlane
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

SERVICE_NAME = "inference.GRPCInferenceService"


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline as an absolute ``time.monotonic()`` instant, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Every RPC needs an API key; health probes use ``grpc.health.v1`` instead."""

    def __init__(self, plane: DataPlane, keys: KeyStore) -> None:
        self._plane = plane
        self._keys = keys

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        self._keys.authenticate(context.invocation_metadata())
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        self._keys.authenticate(context.invocation_metadata())
        return pb.ServerReadyResponse(ready=await self._plane.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        self._keys.authenticate(context.invocation_metadata())
        return pb.ModelReadyResponse(ready=await self._plane.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        self._keys.authenticate(context.invocation_metadata())
        return pb.ServerMetadataResponse(name="moat", version=__version__, extensions=[])

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        self._keys.authenticate(context.invocation_metadata())
        return encode_metadata(await self._plane.metadata(request.name, request.version))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        client = self._keys.authenticate(context.invocation_metadata())
        response = await self._plane.infer(client, decode_request(request), deadline_of(context))
        return encode_response(response)
