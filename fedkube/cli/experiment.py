"""`fedkube experiment submit|list|status|wait|metrics|model|plot|remove`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedkube.api.errors import ConfigError
from fedkube.cli.options import add_client_flags, director_client

if TYPE_CHECKING:
    from fedkube.client import DirectorClient, ExperimentView

Action = Callable[["DirectorClient", argparse.Namespace], int]


def _param(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param wants key=value, got {value!r}")
    try:
        parsed: Any = json.loads(raw)
    except json.JSONDecodeError:
        parsed = raw
    return key, parsed


def submit(client: DirectorClient, args: argparse.Namespace) -> int:
    from fedkube.api.plan import Plan
    from fedkube.client import experiment_archive

    files: dict[str, bytes] = {}
    task = args.task
    if args.archive:
        files[args.archive.name] = args.archive.read_bytes()
        task = task or f"archive:{args.archive.stem}"
    if args.requirements:
        files["requirements.txt"] = args.requirements.read_bytes()
    try:
        plan = Plan(task=task or "digits-logreg", params=dict(args.param), rounds=args.rounds,
                    min_collaborators=args.min_collaborators,
                    round_timeout_s=args.round_timeout,
                    install_requirements=bool(args.requirements))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    archive, model = experiment_archive(plan, files)
    collaborators = args.collaborators.split(",") if args.collaborators else None
    client.submit(args.name, archive, collaborators=collaborators, initial_model=model)
    print(f"experiment {args.name} submitted")
    return 0


def list_experiments(client: DirectorClient, args: argparse.Namespace) -> int:
    rows = client.experiments()
    if args.output == "json":
        print(json.dumps([{"name": n, "status": s, "progress": p} for n, s, p in rows]))
    else:
        for name, status, progress in rows:
            print(f"{name:30} {status:12} {progress:6.0%}")
    return 0


def _status_json(status: ExperimentView) -> str:
    return json.dumps({**asdict(status), "round": status.round})


def status(client: DirectorClient, args: argparse.Namespace) -> int:
    view = client.status(args.name)
    if args.output == "json":
        print(_status_json(view))
    else:
        print(f"{view.name}: {view.status}, round {view.round}/{view.total_rounds}"
              + (f", {view.metric} last {view.last_metrics} best {view.best_metrics}"
                 if view.metric else "")
              + (f", queued at {view.queue_position}" if view.queue_position else "")
              + (f", awaiting approval from {', '.join(view.awaiting_approval)}"
                 if view.awaiting_approval else "")
              + "".join(f"\nrefused by {shard}: {r.reason}" for shard, r in view.review.items()
                        if r.decision == "refused")
              + (f"\nerror: {view.error}" if view.error else ""))
    return 0


def wait(client: DirectorClient, args: argparse.Namespace) -> int:
    from fedkube.client.ui import wait_with_progress

    view = wait_with_progress(client, args.name, timeout=args.timeout)
    print(_status_json(view))
    return 0 if view.status == "finished" else 1


def metrics(client: DirectorClient, args: argparse.Namespace) -> int:
    values = client.metrics(args.name)
    if args.output == "json":
        print(json.dumps([asdict(m) for m in values]))
    else:
        for m in values:
            print(f"round {m.round:4} {m.origin:16} {m.task:20} {m.name:10} {m.value:.4f}")
    return 0


def plot(client: DirectorClient, args: argparse.Namespace) -> int:
    from fedkube.client.plot import plot_metrics

    values = client.metrics(args.name, follow=False)  # a running experiment: so far
    if not values:
        print(f"experiment {args.name} has no metrics yet", file=sys.stderr)
        return 1
    plot_metrics(values, args.out)
    print(f"metrics of {args.name} ({max(m.round for m in values) + 1} rounds) plotted "
          f"to {args.out}")
    return 0


def model(client: DirectorClient, args: argparse.Namespace) -> int:
    import numpy as np

    arrays = client.model(args.name, best=not args.last)
    np.savez(args.out, **arrays)  # type: ignore[arg-type]
    print(f"{'last' if args.last else 'best'} model of {args.name} written to {args.out}")
    return 0


def remove(client: DirectorClient, args: argparse.Namespace) -> int:
    client.remove(args.name)
    print(f"experiment {args.name} removed")
    return 0


ACTIONS: dict[str, Action] = {
    "submit": submit, "list": list_experiments, "status": status, "wait": wait,
    "metrics": metrics, "model": model, "plot": plot, "remove": remove,
}


def run_action(args: argparse.Namespace) -> int:
    with director_client(args) as client:
        return ACTIONS[args.action](client, args)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    experiment = commands.add_parser("experiment", help="submit and follow experiments")
    actions = experiment.add_subparsers(dest="action", required=True)
    for action in ACTIONS:
        sub = actions.add_parser(action)
        add_client_flags(sub)
        if action == "submit":
            sub.add_argument("--name", required=True)
        elif action != "list":
            sub.add_argument("name")
        if action in ("list", "status", "metrics"):
            sub.add_argument("--output", choices=["table", "json"], default="table")
        sub.set_defaults(func=run_action)
    actions.choices["plot"].add_argument("--out", type=Path, required=True,
                                         help="PNG file to write")
    submitting = actions.choices["submit"]
    submitting.add_argument("--task", help="digits-logreg, digits-mlp (default), or with "
                                           "--archive")
    submitting.add_argument("--archive", type=Path, help="a Python module with init_model, "
                                                         "train and validate")
    submitting.add_argument("--requirements", type=Path, help="a requirements.txt that each "
                            "envoy installs into a virtualenv of this experiment")
    submitting.add_argument("--rounds", type=int, default=10)
    submitting.add_argument("--min-collaborators", type=int)
    submitting.add_argument("--round-timeout", type=float, default=600.0)
    submitting.add_argument("--collaborators", help="comma-separated shard names (default: "
                                                    "all online)")
    submitting.add_argument("--param", type=_param, action="append", default=[],
                            metavar="K=V")
    actions.choices["wait"].add_argument("--timeout", type=float, default=3600)
    fetching = actions.choices["model"]
    fetching.add_argument("--out", type=Path, required=True, help="an .npz file")
    kind = fetching.add_mutually_exclusive_group()
    kind.add_argument("--best", action="store_true", default=True)
    kind.add_argument("--last", action="store_true")
