"""The ``moat`` command line: serve the gateway, hash keys, query the admin service."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from collections.abc import Sequence

from gateway.auth import hash_key
from gateway.errors import ConfigError


def _serve(args: argparse.Namespace) -> int:
    from gateway.config import load_config
    from gateway.logs import configure_logging
    from gateway.server import build_gateway

    configure_logging(args.log_level)
    try:
        config = load_config(args.config)
        overrides = {
            field: value for field, value in (
                ("grpc_port", args.grpc_port), ("metrics_port", args.metrics_port),
                ("admin_port", args.admin_port), ("host", args.host),
            ) if value is not None
        }
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, **overrides))
        gateway = build_gateway(config)
    except ConfigError as error:
        print(f"moat: invalid configuration: {error}", file=sys.stderr)
        return 2
    return asyncio.run(_run_until_signal(gateway))


async def _run_until_signal(gateway: object) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await gateway.start()  # type: ignore[attr-defined]
    except OSError as error:
        print(f"moat: cannot start: {error}", file=sys.stderr)
        return 1
    await stop.wait()
    await gateway.stop()  # type: ignore[attr-defined]
    return 0


def _keys_hash(args: argparse.Namespace) -> int:
    key = args.key if args.key is not None else sys.stdin.readline().rstrip("\n")
    if not key:
        print("moat: no key given", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def _admin_call(args: argparse.Namespace, method: str) -> int:
    import grpc

    from gateway.admin_client import AdminClient

    try:
        with AdminClient(args.admin, args.token) as client:
            result = getattr(client, method)()
    except grpc.RpcError as error:
        print(f"moat: admin call failed: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_table(result))
    return 0


def _table(result: dict) -> str:
    rows = result.get("clients") or result.get("models") or []
    if not rows:
        return json.dumps(result, indent=2)
    columns = list(rows[0])
    widths = [max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moat", description="moat: a model-protection gateway")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="YAML config file")
    serve.add_argument("--grpc-port", type=int, help="public Open Inference Protocol port (0: any free port)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus HTTP port")
    serve.add_argument("--admin-port", type=int, help="admin gRPC port")
    serve.add_argument("--host", help="bind address (default from config: 127.0.0.1)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(handler=_serve)

    keys = commands.add_parser("keys", help="API key utilities")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    hash_cmd = keys_commands.add_parser("hash", help="print the SHA-256 to put in the keys file")
    hash_cmd.add_argument("key", nargs="?", help="the key (read from stdin when omitted)")
    hash_cmd.set_defaults(handler=_keys_hash)

    for name, method, text in (("info", "server_info", "gateway version, uptime and models"),
                               ("clients", "list_clients", "clients and their traffic")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--admin", default="127.0.0.1:8003", help="admin address host:port")
        sub.add_argument("--token", default=None, help="admin token (default: $MOAT_ADMIN_TOKEN)")
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        sub.set_defaults(handler=lambda a, m=method: _admin_call(a, m))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
