"""``moat evaluate``: run an evaluation suite against gateways it starts itself (one undefended, one per
defense preset), or against an endpoint someone else runs (``--target HOST:PORT --api-key KEY...``),
and write ``report.json``, ``report.md`` and PNG plots to ``--out``.

This module imports nothing heavy at import time: ``moat serve`` builds its parser without torch.
"""

from __future__ import annotations

import argparse
import signal
import sys

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    """attack gateways with the evaluation suite, report.

    Adds ``moat evaluate``'s options to ``parser`` and makes :func:`run` its handler."""
    parser.add_argument("--suite", default="quick", help="a built-in suite (quick, demo, paper) or a YAML file")
    parser.add_argument("--out", required=True, help="directory for report.json, report.md and the plots")
    parser.add_argument("--target", metavar="HOST:PORT", help="attack this endpoint instead of starting gateways")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help="a thief API key for --target (repeat for sybil attacks; runs take keys in turn)")
    parser.add_argument("--admin", metavar="HOST:PORT", help="the target's admin service (flags, evidence)")
    parser.add_argument("--admin-token", help="admin token for --admin (default $MOAT_ADMIN_TOKEN)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the thieves (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def _error(message: str) -> int:
    print(f"moat evaluate: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run the suite and write the report; 0 on success, 2 on bad input (message names the field)."""
    import os
    from pathlib import Path

    if args.target is None and (args.api_key or args.admin):
        return _error("--api-key and --admin need --target")
    if args.target is not None:
        host, _, port = args.target.rpartition(":")
        if not host or not port.isdigit():
            return _error(f"--target: expected HOST:PORT, got {args.target!r}")
        if not args.api_key:
            return _error("--target needs at least one --api-key")
    if args.threads < 1:
        return _error(f"--threads: must be >= 1, got {args.threads}")
    import torch

    from evaluation.api import evaluate
    from evaluation.report import summary
    from evaluation.runner import Target
    from evaluation.suite import SuiteError, load_suite

    try:
        suite = load_suite(args.suite)
    except SuiteError as error:
        return _error(f"--suite {args.suite}: {error}")
    torch.set_num_threads(args.threads)
    # SIGTERM unwinds like Ctrl-C, so the gateways this run started are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    target = None
    if args.target is not None:
        token = args.admin_token if args.admin_token is not None else os.environ.get("MOAT_ADMIN_TOKEN")
        target = Target(args.target, args.api_key, args.admin, token)
    report = evaluate(suite, args.out, target=target, progress=not args.no_progress)
    out = Path(args.out).resolve()
    print(summary(report))
    print(f"moat evaluate: wrote {out / 'report.json'}, {out / 'report.md'} and {len(report['plots'])} plots")
    return 0
