"""A small synchronous client of the admin service, used by the CLI and by scripts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from protos import admin_pb2 as pb
from protos import admin_pb2_grpc as pb_grpc


def _dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def admin_channel(address: str, *, ca_file: str | None = None, cert_file: str | None = None,
                  key_file: str | None = None) -> grpc.Channel:
    """A channel to the admin service: plaintext, or TLS trusting ``ca_file`` when it is given,
    presenting ``cert_file`` and ``key_file`` to a server that requires client certificates.
    ``ValueError`` names a missing or unreadable file."""
    if ca_file is None:
        if cert_file or key_file:
            raise ValueError("--cert-file and --key-file need --ca-file (the CA that signed the gateway's certificate)")
        return grpc.insecure_channel(address)
    if bool(cert_file) != bool(key_file):
        raise ValueError("--cert-file and --key-file go together")
    try:
        root = Path(ca_file).read_bytes()
        key = Path(key_file).read_bytes() if key_file else None
        chain = Path(cert_file).read_bytes() if cert_file else None
    except OSError as error:
        raise ValueError(f"{error.filename}: {error.strerror}") from None
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root, key, chain))


class AdminClient:
    """Calls the admin service at ``address`` with ``token`` (default ``$MOAT_ADMIN_TOKEN``), over
    TLS when ``ca_file`` is given (see :func:`admin_channel`)."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 10.0, *,
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None) -> None:
        token = token if token is not None else os.environ.get("MOAT_ADMIN_TOKEN", "")
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout
        self._channel = admin_channel(address, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        self._stub = pb_grpc.MoatAdminStub(self._channel)

    def _call(self, method: str, request: Message) -> dict[str, Any]:
        reply = getattr(self._stub, method)(request, metadata=self._metadata, timeout=self._timeout)
        return _dict(reply)

    def server_info(self) -> dict[str, Any]:
        return self._call("GetServerInfo", pb.GetServerInfoRequest())

    def list_clients(self) -> dict[str, Any]:
        return self._call("ListClients", pb.ListClientsRequest())

    def get_client(self, client_id: str) -> dict[str, Any]:
        return self._call("GetClient", pb.ClientRequest(client_id=client_id))

    def unblock(self, client_id: str, model: str = "") -> dict[str, Any]:
        return self._call("UnblockClient", pb.ClientRequest(client_id=client_id, model=model))

    def reset(self, client_id: str, model: str = "") -> dict[str, Any]:
        return self._call("ResetClient", pb.ClientRequest(client_id=client_id, model=model))

    def list_alerts(self, after_id: int = 0, limit: int = 100) -> dict[str, Any]:
        return self._call("ListAlerts", pb.ListAlertsRequest(after_id=after_id, limit=limit))

    def follow_alerts(self, after_id: int = 0) -> Iterator[dict[str, Any]]:
        """Every alert after ``after_id``, then new ones as they come, until interrupted."""
        for alert in self._stub.StreamAlerts(pb.ListAlertsRequest(after_id=after_id), metadata=self._metadata):
            yield _dict(alert)

    def export_evidence(self, client_id: str, model: str = "") -> bytes:
        """The evidence file of ``client_id`` (on ``model``, or the only watermarked model)."""
        chunks = self._stub.ExportEvidence(pb.EvidenceRequest(client_id=client_id, model=model),
                                           metadata=self._metadata, timeout=max(self._timeout, 300.0))
        return b"".join(chunk.data for chunk in chunks)

    def import_evidence(self, data: bytes, chunk_bytes: int = 1024 * 1024) -> dict[str, Any]:
        """Send an evidence file; the gateway checks its checksum and signature before storing it."""
        chunks = (pb.EvidenceChunk(data=data[i:i + chunk_bytes]) for i in range(0, max(len(data), 1), chunk_bytes))
        reply = self._stub.ImportEvidence(chunks, metadata=self._metadata, timeout=max(self._timeout, 300.0))
        return _dict(reply)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
