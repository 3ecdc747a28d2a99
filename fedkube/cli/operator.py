"""`fedkube operator run` and `fedkube crds` (the operator's API as YAML and Markdown)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    operator = commands.add_parser("operator", help="the Kubernetes operator").add_subparsers(
        dest="action", required=True)
    run = operator.add_parser("run", help="reconcile Federations, Shards and Experiments "
                                          "(kubeconfig or in-cluster credentials)")
    run.add_argument("--namespace", action="append", default=[],
                     help="watch only this namespace (repeatable; default: all)")
    run.add_argument("--liveness-port", type=int, help="serve /healthz on this port")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics here")
    run.set_defaults(func=run_operator)

    crds = commands.add_parser("crds", help="write the CustomResourceDefinitions (YAML)")
    crds.add_argument("--out", type=Path, action="append",
                      help="directory to write (repeatable; default: crds)")
    crds.add_argument("--reference", type=Path, help="also write the Markdown reference here")
    crds.set_defaults(func=write_crds)


def run_operator(args: argparse.Namespace) -> int:
    from fedkube.operator.run import run_operator

    run_operator(args.namespace, liveness_port=args.liveness_port,
                 metrics_port=args.metrics_port)
    return 0


def write_crds(args: argparse.Namespace) -> int:
    from fedkube.api.crds import write_crds

    for directory in args.out or [Path("crds")]:
        for path in write_crds(directory):
            print(path)
    if args.reference:
        from fedkube.api.reference import reference_markdown

        args.reference.write_text(reference_markdown())
        print(args.reference)
    return 0
