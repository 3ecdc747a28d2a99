"""`fedkube collaborator run` (envoys start it; not for use by hand)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedkube.cli.exits import ExitCode
from fedkube.cli.options import add_tls_flags, key_values


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    collaborator = commands.add_parser("collaborator", help="run a collaborator (envoys do)")
    run = collaborator.add_subparsers(dest="action", required=True).add_parser("run")
    run.add_argument("--director", required=True, metavar="HOST:PORT",
                     help="the director (its aggregator port)")
    run.add_argument("--experiment", required=True, help="the experiment to train in")
    run.add_argument("--name", required=True, help="this collaborator's (its shard's) name")
    run.add_argument("--archive", type=Path,
                     help="the experiment archive (default: download it from the director)")
    run.add_argument("--work-dir", type=Path, required=True,
                     help="where the archive is extracted and the task runs")
    run.add_argument("--shard", default="digits", help="the shard loader")
    run.add_argument("--shard-option", action="append", default=[], metavar="K=V",
                     help="an option of the shard loader, repeatable")
    run.add_argument("--openfl-python", type=Path,
                     help="the Python of an OpenFL 1.6 environment, for OpenFL experiments")
    add_tls_flags(run)
    run.add_argument("--request-certificate", action="store_true",
                     help="on Kubernetes: first request the shard's certificate from the "
                     "operator, writing it to --cert/--key")
    run.set_defaults(func=run_collaborator, moves_models=True)


def run_collaborator(args: argparse.Namespace) -> int:
    from fedkube.collaborator.environment import RequirementsError
    from fedkube.collaborator.main import CollaboratorOptions, run_collaborator

    options = CollaboratorOptions(
        director=args.director, experiment=args.experiment, name=args.name,
        work_dir=args.work_dir, shard=args.shard,
        shard_options=key_values(args.shard_option, flag="--shard-option"),
        archive=args.archive, insecure=bool(args.insecure), ca=args.ca, cert=args.cert,
        key=args.key, request_certificate=args.request_certificate,
        openfl_python=args.openfl_python)
    try:
        run_collaborator(options, sys.argv[1:])
    except RequirementsError as exc:  # the envoy reports this line as the failure
        print(f"RequirementsError: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    return ExitCode.OK
