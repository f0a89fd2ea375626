"""A small synchronous client of the admin service, used by the CLI and by scripts."""

from __future__ import annotations

import os

import grpc
from google.protobuf.json_format import MessageToDict

from protos import admin_pb2 as pb
from protos import admin_pb2_grpc as pb_grpc


class AdminClient:
    """Calls the admin service at ``address`` with ``token`` (default ``$MOAT_ADMIN_TOKEN``)."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 10.0) -> None:
        token = token if token is not None else os.environ.get("MOAT_ADMIN_TOKEN", "")
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.MoatAdminStub(self._channel)

    def server_info(self) -> dict:
        reply = self._stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self._metadata, timeout=self._timeout)
        return MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

    def list_clients(self) -> dict:
        reply = self._stub.ListClients(pb.ListClientsRequest(), metadata=self._metadata, timeout=self._timeout)
        return MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
