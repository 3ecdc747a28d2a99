"""`fedkube`: the parser of every command, and the one place errors become exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fedkube.cli import (
    certs,
    collaborator,
    dev,
    director,
    envoy,
    experiment,
    operator,
    shard,
    shards,
)
from fedkube.cli.exits import describe

DESCRIPTION = ("Federated learning on Kubernetes: the director, envoys and collaborators, "
               "the operator, and the model owner's commands.")
COMMAND_GROUPS = (director, envoy, shards, shard, collaborator, experiment, dev, operator,
                  certs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedkube", description=DESCRIPTION)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="auto", choices=["auto", "rich", "plain", "json"])
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fedkube.startup import reexec_with_huge_pages, setup_logging

    args = build_parser().parse_args(argv)
    if getattr(args, "moves_models", False):
        reexec_with_huge_pages(sys.argv[1:] if argv is None else list(argv))
    setup_logging(args.log_level, args.log_format)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args))
    except Exception as exc:
        known = describe(exc)
        if known is None:
            raise
        code, line = known
        print(f"fedkube: {line}", file=sys.stderr)
        return int(code)
