"""`fedkube experiment submit|list|status|wait|metrics|model|plot|remove`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from fedkube.api.errors import ConfigError
from fedkube.api.plan import USER_TASK_PREFIX
from fedkube.cli.options import add_client_flags, director_client

if TYPE_CHECKING:
    from fedkube.api.plan import Plan
    from fedkube.client import DirectorClient, ExperimentView
    from fedkube.proto import base_pb2

DEFAULT_TASK = "digits-logreg"
# `--output` of the listing commands (here and `fedkube shards`).
OUTPUTS = ("table", "wide", "json")
OUTPUT_HELP = ("table for people (plain aligned text when piped), wide for more columns, "
               "json for scripts")

Action = Callable[["DirectorClient", argparse.Namespace], int]


def _param(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param wants NAME=VALUE, got {value!r}")
    try:
        parsed: Any = json.loads(raw)
    except json.JSONDecodeError:
        parsed = raw
    return key, parsed


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file; check the path") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror or exc}; check the path") from None


def writable(path: Path, flag: str) -> None:
    """Refuses an output path whose directory does not exist, before any work is done."""
    directory = path.parent
    if not directory.is_dir():
        raise ConfigError(f"{flag} {path}: the directory {directory} does not exist; create "
                          f"it or write elsewhere")
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; name a file in it")


# How a field of the plan is set on the command line, for its validation errors.
PLAN_FLAGS = {"task": "--task", "params": "--param", "rounds": "--rounds",
              "min_collaborators": "--min-collaborators", "round_timeout_s": "--round-timeout"}


def build_plan(args: argparse.Namespace) -> tuple[Plan, dict[str, bytes]]:
    """The plan and files the flags describe, checked as far as can be done here."""
    from fedkube.api.plan import Plan
    from fedkube.tasks.models import BUILTIN_TASKS

    files: dict[str, bytes] = {}
    task = args.task
    if args.archive:
        files[args.archive.name] = _read(args.archive, "--archive")
        if args.archive.suffix != ".py" or not args.archive.stem.isidentifier():
            raise ConfigError(f"--archive {args.archive}: not a Python module (NAME.py, "
                              f"NAME an identifier); rename it")
        task = task or f"{USER_TASK_PREFIX}{args.archive.stem}"
    elif task and task not in BUILTIN_TASKS:
        raise ConfigError(f"unknown task {task!r}; pass --task "
                          f"{' or '.join(sorted(BUILTIN_TASKS))}, or --archive MODULE.py "
                          f"for your own")
    if args.requirements:
        files["requirements.txt"] = _read(args.requirements, "--requirements")
    try:
        plan = Plan(task=task or DEFAULT_TASK, params=dict(args.param), rounds=args.rounds,
                    min_collaborators=args.min_collaborators,
                    round_timeout_s=args.round_timeout,
                    install_requirements=bool(args.requirements))
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        flag = PLAN_FLAGS.get(field, field)
        value = getattr(args, {"round_timeout_s": "round_timeout"}.get(field, field), None)
        shown = f"{flag} {value}" if value is not None and flag != "--param" else flag
        raise ConfigError(f"{shown}: {error['msg'].lower()}; see `fedkube experiment submit "
                          f"--help`") from None
    return plan, files


def _initial(plan: Plan, files: dict[str, bytes], args: argparse.Namespace
             ) -> tuple[bytes, base_pb2.ModelProto]:
    """The archive and initial model, user code's failures as one line naming the file."""
    from fedkube.client import experiment_archive
    from fedkube.tasks.archive import ArchiveError
    from fedkube.tasks.params import ParamsError

    try:
        return experiment_archive(plan, files)
    except ParamsError as exc:
        raise ConfigError(f"--param: {exc}") from None
    except ArchiveError as exc:
        if not args.archive:
            raise ConfigError(str(exc)) from None
        raise ConfigError(f"--archive {args.archive}: {exc}; a task module defines "
                          f"init_model(params), train(model, data, params) and "
                          f"validate(model, data, params)") from None
    except SyntaxError as exc:
        if not args.archive:
            raise
        raise ConfigError(f"--archive {args.archive}: syntax error at line {exc.lineno}: "
                          f"{exc.msg}; fix the module") from None
    except Exception as exc:  # the user's module failed to import or in init_model
        if not args.archive or args.debug:
            raise
        raise ConfigError(f"--archive {args.archive}: importing it or its init_model failed: "
                          f"{type(exc).__name__}: {exc}; fix the module (import what "
                          f"--requirements installs inside train/validate, not at the "
                          f"top)") from None


def check_submit(args: argparse.Namespace) -> None:
    """What `submit` checks before it connects: files, flags, the task and its params."""
    plan, files = build_plan(args)
    args.prepared = (plan, *_initial(plan, files, args))


def submit(client: DirectorClient, args: argparse.Namespace) -> int:
    plan, archive, model = args.prepared
    collaborators = args.collaborators.split(",") if args.collaborators else None
    client.submit(args.name, archive, collaborators=collaborators, initial_model=model)
    print(f"experiment {args.name} submitted ({plan.task}, {plan.rounds} rounds)")
    return 0


def list_experiments(client: DirectorClient, args: argparse.Namespace) -> int:
    from fedkube.client.ui import EXPERIMENT_COLUMNS, experiment_rows, print_table

    rows = client.experiments()
    if args.output == "json":
        print(json.dumps([{"name": n, "status": s, "progress": p} for n, s, p in rows]))
        return 0
    views = {}
    if args.output == "wide":  # one more call per experiment: its rounds and metric
        from contextlib import suppress

        import grpc

        for name, _, _ in rows:
            with suppress(grpc.RpcError):  # removed meanwhile, say: its row shows "-"
                views[name] = client.status(name)
    print_table(EXPERIMENT_COLUMNS, experiment_rows(rows, views), wide=args.output == "wide")
    return 0


def _status_json(status: ExperimentView) -> str:
    return json.dumps({**asdict(status), "round": status.round})


def _best_round(client: DirectorClient, view: ExperimentView) -> int | None:
    """The round of the best model, from the metrics reported so far (None if unknown)."""
    import grpc

    from fedkube.client.ui import best_round

    best = view.best_metrics.get(view.metric)
    if best is None:
        return None
    try:
        metrics = client.metrics(view.name, follow=False, snapshot_s=1.0)
    except grpc.RpcError:
        return None
    return best_round(metrics, view.metric, best)


def status(client: DirectorClient, args: argparse.Namespace) -> int:
    from fedkube.client.ui import status_lines

    view = client.status(args.name)
    if args.output == "json":
        print(_status_json(view))
    else:
        print("\n".join(status_lines(view, round_of_best=_best_round(client, view),
                                     wide=args.output == "wide")))
    return 0


def wait(client: DirectorClient, args: argparse.Namespace) -> int:
    from fedkube.client.ui import wait_with_progress

    view = wait_with_progress(client, args.name, timeout=args.timeout)
    print(_status_json(view))
    return 0 if view.status == "finished" else 1


def metrics(client: DirectorClient, args: argparse.Namespace) -> int:
    from fedkube.client.ui import METRIC_COLUMNS, metric_rows, print_table

    values = client.metrics(args.name)
    if args.output == "json":
        print(json.dumps([asdict(m) for m in values]))
    else:
        print_table(METRIC_COLUMNS, metric_rows(values), wide=args.output == "wide")
    return 0


def plot(client: DirectorClient, args: argparse.Namespace) -> int:
    from fedkube.client.plot import plot_metrics
    from fedkube.client.ui import trained_rounds

    values = client.metrics(args.name, follow=False)  # a running experiment: so far
    if not values:
        print(f"experiment {args.name} has no metrics yet", file=sys.stderr)
        return 1
    view = client.status(args.name)
    plot_metrics(values, args.out, experiment=args.name, metric=view.metric or "accuracy")
    rounds = trained_rounds(values)
    print(f"metrics of {args.name} ({rounds} round{'s' if rounds != 1 else ''}) plotted "
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
    if args.action == "submit":
        check_submit(args)
    if args.action in ("plot", "model"):
        writable(args.out, "--out")
    with director_client(args) as client:
        return ACTIONS[args.action](client, args)


HELP = {
    "submit": "upload an experiment: a built-in task or your own module",
    "list": "your experiments (an admin's: everyone's)",
    "status": "an experiment's state, round and metrics",
    "wait": "follow an experiment until it ends (exit 1 unless it finished)",
    "metrics": "every metric reported so far (follows a running experiment to its end)",
    "model": "download the best (or last) aggregated model as .npz",
    "plot": "plot accuracy and loss by round to a PNG",
    "remove": "delete an experiment and its artefacts from the director",
}


def _param_help() -> str:
    from fedkube.tasks.models import BUILTIN_TASKS
    from fedkube.tasks.params import describe

    tasks = "; ".join(f"{name}: {describe(task.params)}"
                      for name, task in sorted(BUILTIN_TASKS.items()) if task.params)
    return (f"a task parameter, repeatable; VALUE is read as JSON if it parses (1.0, true, "
            f"[1,2]), else as a string. Unknown names and bad values are refused before "
            f"anything is sent. Built-in tasks' parameters: {tasks}. An --archive module may "
            f"declare its own as PARAMS (a pydantic model or a dict of defaults)")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from fedkube.tasks.models import BUILTIN_TASKS

    experiment = commands.add_parser("experiment", help="submit and follow experiments",
                                     description="The model owner's commands: submit "
                                                 "experiments and follow them.")
    actions = experiment.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action in ACTIONS:
        sub = actions.add_parser(action, help=HELP[action], description=HELP[action])
        add_client_flags(sub)
        if action == "submit":
            sub.add_argument("--name", required=True,
                             help="the experiment's name, unique on the director")
        elif action != "list":
            sub.add_argument("name", help="the experiment's name")
        if action in ("list", "status", "metrics"):
            sub.add_argument("--output", choices=OUTPUTS, default="table", help=OUTPUT_HELP)
        sub.set_defaults(func=run_action)
    actions.choices["plot"].add_argument("--out", type=Path, required=True, metavar="FILE",
                                         help="the PNG file to write (its directory must exist)")
    submitting = actions.choices["submit"]
    submitting.add_argument("--task", metavar="TASK",
                            help=f"a built-in task: {', '.join(sorted(BUILTIN_TASKS))} "
                                 f"(default: {DEFAULT_TASK}; with --archive: the module)")
    submitting.add_argument("--archive", type=Path, metavar="MODULE.py",
                            help="your own task: a Python module with init_model(params), "
                                 "train(model, data, params) and validate(model, data, params)")
    submitting.add_argument("--requirements", type=Path, metavar="FILE",
                            help="a requirements.txt that each envoy installs into a "
                                 "virtualenv of this experiment")
    submitting.add_argument("--rounds", type=int, default=10, metavar="N",
                            help="federated rounds: each trains on every shard, then "
                                 "averages (1 to 100000)")
    submitting.add_argument("--min-collaborators", type=int, metavar="N",
                            help="the quorum that closes a round at its timeout "
                                 "(default: every collaborator)")
    submitting.add_argument("--round-timeout", type=float, default=600.0, metavar="SECONDS",
                            help="how long a round waits for its collaborators")
    submitting.add_argument("--collaborators", metavar="SHARD,...",
                            help="comma-separated shard names (default: every shard online)")
    submitting.add_argument("--param", type=_param, action="append", default=[],
                            metavar="NAME=VALUE", help=_param_help())
    actions.choices["wait"].add_argument("--timeout", type=float, default=3600,
                                         metavar="SECONDS",
                                         help="give up after this long (exit 4)")
    fetching = actions.choices["model"]
    fetching.add_argument("--out", type=Path, required=True, metavar="FILE",
                          help="the .npz file to write (its directory must exist)")
    kind = fetching.add_mutually_exclusive_group()
    kind.add_argument("--best", action="store_true", default=True,
                      help="the model of the best validation round (the default)")
    kind.add_argument("--last", action="store_true", help="the last round's model")
