"""moat's admin service (its own port, guarded by the admin token)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from gateway import __version__
from gateway.alerts import AlertSink
from gateway.auth import Client, KeyStore
from gateway.errors import ClientNotFound, InvalidArgument, NotFound
from gateway.evidence import EvidenceError, dump_evidence, load_evidence
from gateway.pipeline import DataPlane
from gateway.secrets import derive_key
from protos import admin_pb2 as pb
from protos import admin_pb2_grpc as pb_grpc

SERVICE_NAME = "moat.admin.v1.MoatAdmin"
ALERT_POLL_SECONDS = 0.2
EVIDENCE_CHUNK_BYTES = 1024 * 1024
#: The largest evidence file ImportEvidence accepts (10,000 demo records take ~14 MB).
MAX_EVIDENCE_FILE_BYTES = 512 * 1024 * 1024


def _model_state(model: str, fields: dict[str, float | str]) -> pb.ClientModelState:
    figures = {k: float(v) for k, v in fields.items() if "." in k and isinstance(v, float)}
    return pb.ClientModelState(
        model=model, queries=int(float(fields.get("queries", 0))),
        coverage=float(fields.get("coverage.coverage", 0.0)), suspicion=float(fields.get("suspicion", 0.0)),
        status=str(fields.get("status", "ok")), figures=figures,
    )


def _alert(record_id: int, record: dict[str, Any]) -> pb.Alert:
    return pb.Alert(
        id=record_id, time=record["time"], time_iso=record["time_iso"], client_id=record["client"],
        model=record["model"], detector=record["detector"], figures=record["figures"], action=record["action"],
    )


class AdminServicer(pb_grpc.MoatAdminServicer):
    def __init__(self, plane: DataPlane, keys: KeyStore, alerts: AlertSink, started: float | None = None,
                 secret: bytes | None = None) -> None:
        self._plane = plane
        # Signs exported evidence files and checks imported ones.
        self._evidence_key = derive_key(secret, "evidence") if secret else None
        self._keys = keys
        self._alerts = alerts
        self._started = time.monotonic() if started is None else started

    def _run(self, function: Any, *args: Any) -> Any:
        """Store reads run off the event loop, like the data plane's."""
        return asyncio.get_running_loop().run_in_executor(None, function, *args)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetServerInfoResponse:
        self._keys.check_admin(context.invocation_metadata())
        names = sorted(self._plane.models)
        ready = await asyncio.gather(*(self._plane.model_ready(name) for name in names))
        models = []
        for name, is_ready in zip(names, ready, strict=True):
            config = self._plane.models[name].config
            models.append(pb.ModelInfo(
                name=name, kind=config.kind, backend=config.backend.name, ready=is_ready,
                detectors=[c.name for c in config.detectors], defenses=[c.name for c in config.defenses],
                watermark=config.watermark.name if config.watermark else "",
            ))
        return pb.GetServerInfoResponse(version=__version__, uptime_seconds=time.monotonic() - self._started,
                                        models=models)

    def _summary(self, client: Client) -> pb.ClientSummary:
        traffic = self._plane.traffic.get(client.id)
        states = [
            _model_state(name, served.protection.client_state(client.id))
            for name, served in sorted(self._plane.models.items()) if served.protection is not None
        ]
        return pb.ClientSummary(
            client_id=client.id, tier=client.tier, requests=traffic.requests if traffic else 0,
            errors=traffic.errors if traffic else 0, models=states,
        )

    async def ListClients(self, request: pb.ListClientsRequest, context: grpc.aio.ServicerContext) -> pb.ListClientsResponse:
        self._keys.check_admin(context.invocation_metadata())
        clients = self._keys.clients
        await self._plane.settle()  # the detection of every answered request is counted
        summaries = await self._run(lambda: [self._summary(client) for client in clients])
        return pb.ListClientsResponse(clients=summaries)

    def _client(self, client_id: str) -> Client:
        client = next((c for c in self._keys.clients if c.id == client_id), None)
        if client is None:
            raise ClientNotFound(f"unknown client '{client_id}'")
        return client

    async def GetClient(self, request: pb.ClientRequest, context: grpc.aio.ServicerContext) -> pb.ClientSummary:
        self._keys.check_admin(context.invocation_metadata())
        client = self._client(request.client_id)
        await self._plane.settle()
        return await self._run(self._summary, client)

    def _protections(self, model: str) -> list[Any]:
        if model:
            return [p for p in [self._plane.model(model).protection] if p is not None]
        return [served.protection for served in self._plane.models.values() if served.protection is not None]

    async def UnblockClient(self, request: pb.ClientRequest, context: grpc.aio.ServicerContext) -> pb.ClientActionResponse:
        self._keys.check_admin(context.invocation_metadata())
        client = self._client(request.client_id)
        protections = self._protections(request.model)
        changed = await self._plane.for_client(client.id, lambda: sum(p.unblock(client.id) for p in protections))
        return pb.ClientActionResponse(changed=changed)

    async def ResetClient(self, request: pb.ClientRequest, context: grpc.aio.ServicerContext) -> pb.ClientActionResponse:
        self._keys.check_admin(context.invocation_metadata())
        client = self._client(request.client_id)
        protections = self._protections(request.model)
        changed = await self._plane.for_client(client.id, lambda: sum(1 for p in protections if p.reset(client.id)))
        return pb.ClientActionResponse(changed=changed)

    async def ListAlerts(self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext) -> pb.ListAlertsResponse:
        self._keys.check_admin(context.invocation_metadata())
        await self._plane.settle()
        records = await self._run(self._alerts.read, request.after_id, request.limit or 100)
        return pb.ListAlertsResponse(alerts=[_alert(i, r) for i, r in records])

    async def StreamAlerts(self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Alert]:
        self._keys.check_admin(context.invocation_metadata())
        after = request.after_id
        while True:
            for record_id, record in await self._run(self._alerts.read, after, 1000):
                after = record_id
                yield _alert(record_id, record)
            await asyncio.sleep(ALERT_POLL_SECONDS)

    def _watermarked(self, model: str) -> Any:
        """The served model ``model`` (or the only watermarked one when empty) that has a watermark."""
        if model:
            served = self._plane.model(model)
            if served.config.watermark is None or served.protection is None:
                raise NotFound(f"model '{model}' has no watermark")
            return served
        marked = [s for s in self._plane.models.values() if s.config.watermark and s.protection]
        if len(marked) != 1:
            names = ", ".join(sorted(s.config.name for s in marked)) or "none"
            raise InvalidArgument(f"name the model: watermarked models are {names}")
        return marked[0]

    def _export(self, client: str, served: Any) -> bytes:
        records: list[tuple[int, dict[str, Any]]] = []
        while batch := served.protection.evidence(client, records[-1][0] if records else 0, 1000):
            records += batch
        mark = served.config.watermark
        return dump_evidence(model=served.config.name, kind=served.config.kind, client=client,
                             watermark={"name": mark.name, "params": dict(mark.params)}, records=records,
                             key=self._key())

    def _key(self) -> bytes:
        if self._evidence_key is None:
            raise InvalidArgument("this gateway has no server secret to sign evidence with")
        return self._evidence_key

    async def ExportEvidence(self, request: pb.EvidenceRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EvidenceChunk]:
        self._keys.check_admin(context.invocation_metadata())
        client = self._client(request.client_id)
        served = self._watermarked(request.model)
        await self._plane.settle()
        data = await self._run(self._export, client.id, served)
        for start in range(0, len(data), EVIDENCE_CHUNK_BYTES):
            yield pb.EvidenceChunk(data=data[start:start + EVIDENCE_CHUNK_BYTES])

    async def ImportEvidence(self, request_iterator: AsyncIterator[pb.EvidenceChunk],
                             context: grpc.aio.ServicerContext) -> pb.ImportEvidenceResponse:
        self._keys.check_admin(context.invocation_metadata())
        parts, size = [], 0
        async for chunk in request_iterator:
            size += len(chunk.data)
            if size > MAX_EVIDENCE_FILE_BYTES:
                raise InvalidArgument(f"evidence file larger than {MAX_EVIDENCE_FILE_BYTES} bytes")
            parts.append(chunk.data)
        try:
            evidence = load_evidence(b"".join(parts), self._key())
        except EvidenceError as error:
            raise InvalidArgument(str(error)) from None
        client = self._client(evidence.client)
        served = self._watermarked(evidence.model)
        stored = await self._run(served.protection.import_evidence, client.id, list(evidence.records))
        return pb.ImportEvidenceResponse(client_id=client.id, model=served.config.name, records=stored)
