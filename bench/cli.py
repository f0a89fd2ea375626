"""``moat bench --out DIR``: run the benchmark scenarios, print the table and the target ratios,
write ``DIR/bench.json``.

Scenarios (``--scenarios``, default all): ``overhead`` (:mod:`bench.overhead`),
``detectors`` (:mod:`bench.components`), ``state`` (:mod:`bench.state`) and
``embedded`` (:mod:`bench.embedded`). ``--quick`` runs each at toy size (a smoke test of
the harness, not a measurement). ``--compare NAME=TREE`` adds to ``overhead`` a contender running
another checkout's code (an A/B); ``--unbatched`` one with no upstream batching. Numbers depend
on the machine and on what else runs on it: the client, the proxies and the model server share
its cores.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

SCENARIOS = ("overhead", "detectors", "state", "embedded")
QUICK = {"rounds": 2, "requests": {1: 40, 32: 96}, "histories": (100, 1_000), "clients": (10, 200),
         "calls": 100, "state_clients": 50, "embedded_requests": {1: 50, 32: 200}}
FULL = {"rounds": 5, "requests": {1: 300, 32: 1500}, "histories": (1_000, 10_000, 100_000),
        "clients": (10, 100_000), "calls": 2000, "state_clients": 2000,
        "embedded_requests": {1: 500, 32: 2000}}


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(valid: tuple[str, ...]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n for n in text.split(",") if n)
        unknown = [n for n in names if n not in valid]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0] if unknown else 'empty list'!r}; "
                                             f"valid: {', '.join(valid)}")
        return names
    return parse


def _compare(text: str) -> tuple[str, Path]:
    """``NAME=TREE`` of ``--compare``: a contender name and a moat checkout to serve it from."""
    name, sep, tree = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or not tree:
        raise argparse.ArgumentTypeError(f"expected NAME=TREE (NAME of letters, digits, '.', '_', '-'), got {text!r}")
    path = Path(tree).expanduser().resolve()
    if not (path / "gateway" / "cli.py").is_file():
        raise argparse.ArgumentTypeError(f"{tree!r} is not a moat checkout (no gateway/cli.py in it)")
    return name, path


def configure(parser: argparse.ArgumentParser) -> None:
    """benchmarks: overhead vs a bare proxy, detector and store cost.

    Adds ``moat bench``'s options to ``parser`` and makes :func:`run` its handler."""
    parser.add_argument("--out", required=True, type=Path, help="directory for bench.json (created)")
    parser.add_argument("--scenarios", type=_names(SCENARIOS), default=SCENARIOS,
                        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the harness, measures nothing")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per measurement (default 5; quick 2)")
    parser.add_argument("--histories", type=_ints, help="detector histories (default 1000,10000,100000)")
    parser.add_argument("--clients", type=_ints, help="two client counts for the store (default 10,100000)")
    parser.add_argument("--stores", type=_names(("memory", "sqlite", "redis")), default=("memory", "sqlite"),
                        help="stores of the detector-history measurement (default memory,sqlite)")
    parser.add_argument("--compare", type=_compare, action="append", default=[], metavar="NAME=TREE",
                        help="overhead: also run moat-full from the moat checkout TREE as contender "
                             "moat-full@NAME (an A/B of a change; repeatable)")
    parser.add_argument("--unbatched", action="store_true",
                        help="overhead: also run moat-full@unbatched, full protection with no upstream batching "
                             "(each request sent upstream alone, as before max_batch_rows)")
    parser.add_argument("--client-stores", type=_names(("memory", "sqlite", "redis")), default=("sqlite", "redis"),
                        help="stores of the 10-vs-100,000-clients measurement (default sqlite,redis)")
    parser.set_defaults(handler=run)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = dict(QUICK if args.quick else FULL)
    if args.rounds is not None:
        if args.rounds < 1:
            raise ValueError(f"--rounds: must be >= 1, got {args.rounds}")
        settings["rounds"] = args.rounds
    if args.histories:
        settings["histories"] = args.histories
    names = [name for name, _ in args.compare]
    if names and "overhead" not in args.scenarios:
        raise ValueError("--compare: applies to the overhead scenario, which is not among --scenarios")
    if args.unbatched and "overhead" not in args.scenarios:
        raise ValueError("--unbatched: applies to the overhead scenario, which is not among --scenarios")
    if "unbatched" in names and args.unbatched:
        raise ValueError("--compare: NAME 'unbatched' is taken by --unbatched")
    if len(set(names)) != len(names):
        raise ValueError(f"--compare: each NAME once, got {', '.join(names)}")
    if args.clients:
        if len(args.clients) != 2:
            raise ValueError(f"--clients: give two counts (few,many), got {','.join(map(str, args.clients))}")
        settings["clients"] = args.clients
    return settings


def run(args: argparse.Namespace) -> int:
    """Run the chosen scenarios; 0 when they ran (targets missed or not), 2 on bad options."""
    try:
        settings = _settings(args)
    except ValueError as error:
        print(f"moat bench: {error}", file=sys.stderr)
        return 2
    import faiss

    from bench.results import ratio_table, results_table, write_json

    faiss.omp_set_num_threads(1)  # as the gateway serves (see gateway.server.build_gateway)
    args.out.mkdir(parents=True, exist_ok=True)
    results, ratios = [], []
    with tempfile.TemporaryDirectory(prefix="moat-bench-") as tmp:
        for scenario in args.scenarios:
            workdir = Path(tmp) / scenario
            workdir.mkdir()
            print(f"== {scenario}", file=sys.stderr, flush=True)
            found, ratio = _SCENARIOS[scenario](workdir, settings, args)
            results += found
            ratios += ratio
    print(results_table(results))
    print()
    print(ratio_table(ratios))
    argv = sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else sys.argv[1:]
    command = " ".join(["moat bench", *(shlex.quote(a) for a in argv)])
    write_json(args.out / "bench.json", results, ratios, command)
    print(f"\nwrote {args.out / 'bench.json'}")
    return 0


def _overhead(workdir: Path, s: dict[str, Any], args: argparse.Namespace) -> tuple[list, list]:
    from bench.overhead import overhead_ratios, run_overhead

    results = run_overhead(workdir, requests=s["requests"], rounds=s["rounds"], compare=dict(args.compare),
                           unbatched=args.unbatched)
    return results, overhead_ratios(results)


CLIENT_STORES = ("few", "many", "young")  # the stores of components.clients_results, by role


def _client_stores(name: str, workdir: Path, redis_url: str | None) -> tuple[Any, Any, Any]:
    from gateway.state.base import create_store

    params = {"memory": lambda role: {}, "sqlite": lambda role: {"path": str(workdir / f"{role}.db")},
              "redis": lambda role: {"url": redis_url, "prefix": f"{role}:"}}[name]
    few, many, young = (create_store(name, params(role)) for role in CLIENT_STORES)
    return few, many, young


def _detectors(workdir: Path, s: dict[str, Any], args: argparse.Namespace) -> tuple[list, list]:
    from bench.components import (
        MODELS,
        clients_ratios,
        clients_results,
        history_ratios,
        history_results,
    )
    from bench.procs import Processes
    from gateway.state.base import create_store

    results = []
    with Processes(workdir) as procs:
        redis_url = procs.redis() if "redis" in (*args.stores, *args.client_stores) else None
        for name in args.stores:
            params = {"memory": {}, "sqlite": {"path": str(workdir / "history.db")},
                      "redis": {"url": redis_url, "prefix": "history:"}}[name]
            store = create_store(name, params)
            try:
                results += history_results(store, name, list(MODELS), s["histories"], (1, 32), s["calls"] // 10)
            finally:
                store.close()
        for name in args.client_stores:
            stores = _client_stores(name, workdir, redis_url)
            try:
                results += clients_results({name: stores}, "fashion-encoder", s["clients"],
                                           calls=max(50, s["calls"] // 10), rounds=s["rounds"])
            finally:
                for store in stores:
                    store.close()
    return results, history_ratios(results, s["histories"]) + clients_ratios(results, s["clients"])


def _state(workdir: Path, s: dict[str, Any], args: argparse.Namespace) -> tuple[list, list]:
    from bench.state import run_state, state_ratios

    results = run_state(workdir, calls=s["calls"], rounds=s["rounds"], clients=s["state_clients"])
    return results, state_ratios(results)


def _embedded(workdir: Path, s: dict[str, Any], args: argparse.Namespace) -> tuple[list, list]:
    from bench.embedded import embedded_ratios, run_embedded

    results = run_embedded(requests=s["embedded_requests"], rounds=s["rounds"])
    return results, embedded_ratios(results)


_SCENARIOS = {"overhead": _overhead, "detectors": _detectors, "state": _state, "embedded": _embedded}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moat bench", description=__doc__.split("\n\n")[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
