"""moat's admin service (its own port, guarded by the admin token)."""

from __future__ import annotations

import asyncio
import time

import grpc

from gateway import __version__
from gateway.auth import KeyStore
from gateway.pipeline import DataPlane
from protos import admin_pb2 as pb
from protos import admin_pb2_grpc as pb_grpc

SERVICE_NAME = "moat.admin.v1.MoatAdmin"


class AdminServicer(pb_grpc.MoatAdminServicer):
    def __init__(self, plane: DataPlane, keys: KeyStore, started: float | None = None) -> None:
        self._plane = plane
        self._keys = keys
        self._started = time.monotonic() if started is None else started

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        self._keys.check_admin(context.invocation_metadata())
        names = sorted(self._plane.models)
        ready = await asyncio.gather(*(self._plane.model_ready(name) for name in names))
        models = [
            pb.ModelInfo(
                name=name, kind=self._plane.models[name].config.kind,
                backend=self._plane.models[name].config.backend.name, ready=is_ready,
            )
            for name, is_ready in zip(names, ready, strict=True)
        ]
        return pb.GetServerInfoResponse(
            version=__version__, uptime_seconds=time.monotonic() - self._started, models=models
        )

    async def ListClients(
        self, request: pb.ListClientsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListClientsResponse:
        self._keys.check_admin(context.invocation_metadata())
        summaries = []
        for client in self._keys.clients:
            traffic = self._plane.traffic.get(client.id)
            summaries.append(pb.ClientSummary(
                client_id=client.id, tier=client.tier,
                requests=traffic.requests if traffic else 0, errors=traffic.errors if traffic else 0,
            ))
        return pb.ListClientsResponse(clients=summaries)
