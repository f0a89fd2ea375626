"""The floor for any Python gRPC hop: a minimal pass-through ``grpc.aio`` proxy.

Every unary-unary call is forwarded as opaque bytes (no protobuf parsing, no metadata) to the
upstream over one shared channel, with the caller's deadline. Nothing else: no auth, no decode,
no checks. ``moat bench`` compares moat against this.

``python -m bench.proxy --port N --upstream HOST:PORT`` logs ``{"event": "serving",
"port": N}`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence

import grpc

MAX_BYTES = 64 * 1024 * 1024
OPTIONS = [("grpc.max_send_message_length", MAX_BYTES), ("grpc.max_receive_message_length", MAX_BYTES)]


class PassThrough(grpc.GenericRpcHandler):
    """Forwards every unary-unary method to ``channel`` unchanged (bytes in, bytes out)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        call = self._calls.get(method)
        if call is None:
            call = self._calls[method] = self._channel.unary_unary(method)

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                return await call(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as error:
                await context.abort(error.code(), error.details() or "")

        return grpc.unary_unary_rpc_method_handler(forward)


async def serve(port: int, upstream: str) -> None:
    channel = grpc.aio.insecure_channel(upstream, options=OPTIONS)
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers([PassThrough(channel)])
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(json.dumps({"event": "serving", "port": bound}), flush=True)
    await server.wait_for_termination()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the model server")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.upstream))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
