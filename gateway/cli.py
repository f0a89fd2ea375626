"""The ``moat`` command line: serve the gateway, hash keys, query the admin service."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from contracts.registry import Registry
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
                ("admin_port", args.admin_port), ("host", args.host), ("admin_host", args.admin_host),
                ("metrics_host", args.metrics_host),
            ) if value is not None
        }
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, **overrides))
        gateway = build_gateway(config)
    except ConfigError as error:
        print(f"moat: invalid configuration: {error}", file=sys.stderr)
        return 2
    return asyncio.run(_run_until_signal(gateway))


async def _run_until_signal(gateway: object) -> int:
    from gateway.server import freeze_startup_heap

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await gateway.start()  # type: ignore[attr-defined]
    except OSError as error:
        print(f"moat: cannot start: {error}", file=sys.stderr)
        return 1
    freeze_startup_heap()
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


def _admin(args: argparse.Namespace, action: Callable[[Any], Any]) -> int:
    import grpc

    from gateway.admin_client import AdminClient

    try:
        with AdminClient(args.admin, args.token, ca_file=args.ca_file, cert_file=args.cert_file,
                         key_file=args.key_file) as client:
            return int(action(client) or 0)
    except ValueError as error:
        print(f"moat: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        print(f"moat: admin call failed: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _print(args: argparse.Namespace, result: dict, rows: list[dict] | None = None) -> None:
    print(json.dumps(result, indent=2) if args.json else _table(rows if rows is not None else [result]))


def _client_rows(clients: list[dict]) -> list[dict]:
    rows = []
    for client in clients:
        states = client.get("models") or [{}]
        for state in states:
            rows.append({
                "client": client["client_id"], "tier": client["tier"], "model": state.get("model", "-"),
                "queries": state.get("queries", 0), "coverage": f"{state.get('coverage', 0.0):.1f}%",
                "suspicion": f"{state.get('suspicion', 0.0):.2f}", "status": state.get("status", "-"),
            })
    return rows


#: ``moat clients top --by``: the sort keys, most suspicious first (ties broken by the next figures).
TOP_ORDER = {"suspicion": ("suspicion", "coverage", "queries"), "coverage": ("coverage", "suspicion", "queries"),
             "queries": ("queries", "suspicion", "coverage")}


def top_clients(clients: list[dict], by: str = "suspicion", limit: int = 10, model: str | None = None) -> list[dict]:
    """The ``limit`` client-model states with the highest ``by`` (see ``TOP_ORDER``), one row each with
    numeric ``queries``, ``coverage`` (percent) and ``suspicion``; only ``model``'s states when given."""
    rows = [{"client": c["client_id"], "tier": c["tier"], "model": s["model"], "queries": int(s.get("queries", 0)),
             "coverage": float(s.get("coverage", 0.0)), "suspicion": float(s.get("suspicion", 0.0)),
             "status": s.get("status", "ok")}
            for c in clients for s in c.get("models") or [] if not model or s["model"] == model]
    rows.sort(key=lambda row: tuple(row[k] for k in TOP_ORDER[by]), reverse=True)
    return rows[:limit]


def _top(args: argparse.Namespace, client: Any) -> None:
    rows = top_clients(client.list_clients()["clients"], args.by, args.limit, args.model)
    if args.json:
        print(json.dumps({"by": args.by, "clients": rows}, indent=2))
        return
    print(_table([{**r, "coverage": f"{r['coverage']:.1f}%", "suspicion": f"{r['suspicion']:.2f}"} for r in rows]))


def _clients(args: argparse.Namespace) -> int:
    def run(client: Any) -> None:
        if args.action == "list":
            result = client.list_clients()
            _print(args, result, _client_rows(result["clients"]))
        elif args.action == "top":
            _top(args, client)
        elif args.action == "show":
            result = client.get_client(args.client_id)
            _print(args, result, _client_rows([result]))
        else:
            method = client.unblock if args.action == "unblock" else client.reset
            _print(args, method(args.client_id, args.model or ""))

    if args.action == "top" and args.limit < 1:
        print(f"moat: clients top --limit must be at least 1, got {args.limit}", file=sys.stderr)
        return 2
    if args.action not in ("list", "top") and not args.client_id:
        print(f"moat: clients {args.action} needs a client id", file=sys.stderr)
        return 2
    return _admin(args, run)


def _alert_line(alert: dict) -> str:
    figures = ", ".join(f"{k}={v:.3g}" for k, v in sorted(alert.get("figures", {}).items()))
    return (f"{alert['time_iso']}  #{alert['id']}  client={alert['client_id']}  model={alert['model']}  "
            f"detector={alert['detector']}  action={alert['action']}  {figures}")


def _alerts(args: argparse.Namespace) -> int:
    def run(client: Any) -> None:
        alerts = client.follow_alerts(args.after) if args.follow else client.list_alerts(args.after, args.limit)["alerts"]
        for alert in alerts:
            print(json.dumps(alert) if args.json else _alert_line(alert), flush=True)

    return _admin(args, run)


def _info(args: argparse.Namespace) -> int:
    def run(client: Any) -> None:
        result = client.server_info()
        _print(args, result, result["models"])

    return _admin(args, run)


def _evidence(args: argparse.Namespace) -> int:
    def run(client: Any) -> None:
        if args.action == "export":
            data = client.export_evidence(args.client, args.model or "")
            with open(args.output, "wb") as handle:
                handle.write(data)
            count = json.loads(data)["count"]
            if args.json:
                print(json.dumps({"client": args.client, "count": count, "file": args.output}))
            else:
                print(f"exported {count} evidence records of client {args.client} to {args.output}")
        else:
            print(json.dumps(client.import_evidence(args.file)))

    if args.action == "export" and not (args.client and args.output):
        print("moat: evidence export needs --client ID and -o FILE", file=sys.stderr)
        return 2
    if args.action == "import":
        if not args.file:
            print("moat: evidence import needs a FILE", file=sys.stderr)
            return 2
        try:
            with open(args.file, "rb") as handle:
                args.file = handle.read()
        except OSError as error:
            print(f"moat: cannot read {args.file}: {error.strerror}", file=sys.stderr)
            return 2
    return _admin(args, run)


def _verify(args: argparse.Namespace) -> int:
    from gateway.verify import VerifyError, endpoint_suspect, torchscript_suspect

    if bool(args.evidence) == bool(args.config) or (args.config and not args.model):
        print("moat verify: give --config CONFIG --model NAME (fresh probes), or --evidence FILE", file=sys.stderr)
        return 2
    if bool(args.suspect) == bool(args.suspect_endpoint) or (args.suspect_endpoint and not args.model):
        print("moat verify: give --suspect MODEL_FILE, or --suspect-endpoint HOST:PORT with --model NAME",
              file=sys.stderr)
        return 2
    if args.secret_file and not args.evidence:
        print("moat verify: --secret-file checks an --evidence file's signature", file=sys.stderr)
        return 2

    def load_suspect() -> Callable[[Any], Any]:
        return (torchscript_suspect(args.suspect) if args.suspect
                else endpoint_suspect(args.suspect_endpoint, args.suspect_model or args.model, args.api_key))

    try:
        return _verify_on_probes(args, load_suspect()) if args.config else _verify_evidence(args, load_suspect)
    except VerifyError as error:
        print(f"moat verify: {error}", file=sys.stderr)
        return 1


def _evidence_key(secret_file: str | None) -> bytes | None:
    """The key of the gateway's evidence signatures, derived from its server secret file (as the
    admin service derives it); None without a file. ``ValueError`` names a bad file."""
    from gateway.secrets import MIN_SECRET_BYTES, derive_key

    if secret_file is None:
        return None
    try:
        with open(secret_file, "rb") as handle:
            secret = handle.read().strip()
    except OSError as error:
        raise ValueError(f"--secret-file {secret_file}: {error.strerror}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"--secret-file {secret_file}: a server secret has at least {MIN_SECRET_BYTES} bytes, "
                         f"got {len(secret)}")
    return derive_key(secret, "evidence")


def _verify_evidence(args: argparse.Namespace, load_suspect: Callable[[], Callable[[Any], Any]]) -> int:
    """The evidence file is read and checked before the suspect is loaded or asked anything."""
    from gateway.evidence import EvidenceError, load_evidence
    from gateway.verify import VerifyError, verify, write_result

    try:
        key = _evidence_key(args.secret_file)
        with open(args.evidence, "rb") as handle:
            evidence = load_evidence(handle.read(), key)
    except OSError as error:
        print(f"moat verify: cannot read {args.evidence}: {error.strerror}", file=sys.stderr)
        return 2
    except EvidenceError as error:
        print(f"moat verify: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"moat verify: {error}", file=sys.stderr)
        return 2
    if key is None:
        print("moat verify: note: only the file's SHA-256 was checked, which anyone can recompute; give "
              "--secret-file (the gateway's server secret) to check its signature too", file=sys.stderr)
    try:
        result = verify(evidence, load_suspect(), args.alpha)
    except VerifyError as error:
        print(f"moat verify: {error}", file=sys.stderr)
        return 1
    print(write_result(result, args.output))
    return 0


def _verify_on_probes(args: argparse.Namespace, suspect: Callable[[Any], Any]) -> int:
    from defenses.proof import ProofError
    from gateway.config import load_config
    from gateway.prove import (
        DEFAULT_PROBES,
        clean_answers,
        load_probes,
        model_watermark,
        prove_on_probes,
    )
    from gateway.verify import suspect_answers, write_result

    try:
        config = load_config(args.config)
        entry, watermark = model_watermark(config, args.model)
        probes = load_probes(args.probes or DEFAULT_PROBES)
    except (ConfigError, ValueError) as error:  # a bad config, model or probes: nothing was tested
        print(f"moat verify: {error}", file=sys.stderr)
        return 2
    try:
        proof = prove_on_probes(watermark, probes, clean_answers(entry, config, probes),
                                suspect_answers(suspect, probes))
    except ProofError as error:
        print(f"moat verify: {error}", file=sys.stderr)
        return 1
    result = {"model": entry.name, "watermark": watermark.name, "probes_source": args.probes or DEFAULT_PROBES,
              **proof.as_dict(args.alpha)}
    print(write_result(result, args.output))
    return 0


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(none)"
    columns = list(rows[0])
    cells = [[", ".join(map(str, v)) if isinstance(v, list) else str(v) for v in (r.get(c, "") for c in columns)]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin", default="127.0.0.1:8003", help="admin address host:port")
    parser.add_argument("--token", default=None, help="admin token (default: $MOAT_ADMIN_TOKEN)")
    parser.add_argument("--ca-file", help="speak TLS, trusting this CA (PEM) for the gateway's certificate")
    parser.add_argument("--cert-file", help="with --ca-file: a client certificate (PEM) for mutual TLS")
    parser.add_argument("--key-file", help="with --cert-file: its private key (PEM)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


# More subcommands come by entry point in the ``moat.commands`` group: a callable
# ``configure(parser)`` that adds its options and a ``handler``; the first line of its docstring is
# the help. moat's evaluation suite (``evaluate``) and benchmarks (``bench``) come this way, so the
# gateway never imports them and the proxy image runs without them.
COMMANDS: Registry[None] = Registry("command", group="moat.commands")


def _add_plugin_commands(commands: Any) -> None:
    for name in COMMANDS.names():
        try:
            configure = COMMANDS.get(name)
        except KeyError as error:  # a plugin that is declared but not installed: say so, keep the rest
            commands.add_parser(name, help=f"unavailable: {error.args[0]}")
            continue
        configure(commands.add_parser(name, help=(configure.__doc__ or "").strip().splitlines()[0].rstrip(".")
                                      if configure.__doc__ else None))


def _parser(with_plugins: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moat", description="moat: a model-protection gateway")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="YAML config file")
    serve.add_argument("--grpc-port", type=int, help="public Open Inference Protocol port (0: any free port)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus HTTP port")
    serve.add_argument("--admin-port", type=int, help="admin gRPC port")
    serve.add_argument("--host", help="the public listener's address (default from config: 127.0.0.1)")
    serve.add_argument("--admin-host", help="the admin listener's address (default from config: 127.0.0.1)")
    serve.add_argument("--metrics-host", help="the /metrics listener's address (default from config: 127.0.0.1)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(handler=_serve)

    keys = commands.add_parser("keys", help="API key utilities")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    hash_cmd = keys_commands.add_parser("hash", help="print the SHA-256 to put in the keys file")
    hash_cmd.add_argument("key", nargs="?", help="the key (read from stdin when omitted)")
    hash_cmd.set_defaults(handler=_keys_hash)

    info = commands.add_parser("info", help="gateway version, uptime and models")
    _admin_options(info)
    info.set_defaults(handler=_info)

    clients = commands.add_parser("clients", help="clients, their coverage, suspicion and status")
    clients.add_argument("action", nargs="?", default="list", choices=["list", "top", "show", "reset", "unblock"])
    clients.add_argument("client_id", nargs="?", help="the client, for show, reset and unblock")
    clients.add_argument("--model", help="limit top, reset or unblock to one model")
    clients.add_argument("--by", choices=sorted(TOP_ORDER), default="suspicion",
                         help="top: rank by this figure (default: suspicion)")
    clients.add_argument("-n", "--limit", type=int, default=10, help="top: how many rows (default 10)")
    _admin_options(clients)
    clients.set_defaults(handler=_clients)

    alerts = commands.add_parser("alerts", help="extraction alerts")
    alerts.add_argument("--follow", "-f", action="store_true", help="keep printing new alerts")
    alerts.add_argument("--after", type=int, default=0, help="only alerts with a larger id")
    alerts.add_argument("--limit", type=int, default=100, help="at most this many (without --follow)")
    _admin_options(alerts)
    alerts.set_defaults(handler=_alerts)

    evidence = commands.add_parser("evidence", help="export or import a client's watermark evidence")
    evidence.add_argument("action", choices=["export", "import"])
    evidence.add_argument("file", nargs="?", help="the evidence file to import")
    evidence.add_argument("--client", help="the client whose evidence to export")
    evidence.add_argument("--model", help="the watermarked model (needed when several are)")
    evidence.add_argument("-o", "--output", help="where to write the exported evidence file")
    _admin_options(evidence)
    evidence.set_defaults(handler=_evidence)

    check = commands.add_parser("verify", help="test a suspect model for the watermark: on fresh probes "
                                "(--config, --model) or against exported evidence (--evidence)")
    check.add_argument("--config", help="the gateway's config: the watermark's rule is recomputed from its secret")
    check.add_argument("--probes", help="fresh probe images: a .npy/.npz file or DATASET[:SPLIT] "
                                        "(default fashion-mnist:test)")
    check.add_argument("--evidence", help="an evidence file (moat evidence export)")
    check.add_argument("--secret-file", help="with --evidence: the gateway's server secret file; the file's "
                                             "signature (HMAC) must then match, so a re-checksummed forgery fails")
    check.add_argument("--suspect", help="the suspect as a TorchScript file")
    check.add_argument("--suspect-endpoint", help="the suspect's Open Inference Protocol gRPC address HOST:PORT")
    check.add_argument("--model", help="the protected model's name (with --config), also the suspect endpoint's")
    check.add_argument("--suspect-model", help="the suspect endpoint's model name, when not --model")
    check.add_argument("--api-key", help="API key for the suspect endpoint (sent as a bearer token)")
    check.add_argument("--alpha", type=float, default=0.01, help="significance level for 'stolen' (default 0.01)")
    check.add_argument("-o", "--output", help="also write the JSON result to this file")
    check.set_defaults(handler=_verify)

    if with_plugins:
        _add_plugin_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A built-in command needs no plugin loaded: `moat serve` imports nothing it does not run.
    builtin = _parser(with_plugins=False)
    builtin_names = next(a.choices for a in builtin._actions if isinstance(a, argparse._SubParsersAction))
    if argv and argv[0] not in builtin_names and argv[0] in COMMANDS.names():
        try:
            COMMANDS.get(argv[0])
        except KeyError as error:  # declared but not installed here (the proxy image has no suite)
            print(f"moat: {error.args[0]}", file=sys.stderr)
            return 2
    args = (builtin if argv and argv[0] in builtin_names else _parser()).parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
