"""`nla-serve`: flags and environment -> settings -> run. Nothing else lives here.

Subcommands: ``serve`` (the HTTP server), ``audit`` (verify, search and export the record), ``batch
run`` (a batch file answered offline), and the NLA tools ``train``, ``eval``, ``calibrate``
(registered by ``nla_serve.train.cli`` when present).
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nla-serve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from nla_serve.api.serve import register as register_serve

    register_serve(sub)
    from nla_serve.audit.cli import register as register_audit

    register_audit(sub)
    from nla_serve.batch.cli import register as register_batch

    register_batch(sub)
    from nla_serve.batch.report import register as register_report

    register_report(sub)
    try:
        from nla_serve.train.cli import register as register_train
    except ImportError:  # the trainer is optional at import time
        register_train = None
    if register_train is not None:
        register_train(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    sys.exit(args.func(args) or 0)
