"""`fedkube` command line: director, envoy, shards, certs, demo (and more as roles land)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedkube.api.config import (
    ConfigError,
    DirectorConfig,
    EnvoyConfig,
    TLSSettings,
    build_config,
    parse_shape,
)
from fedkube.transport.shard_certificate import CertificateRefused

log = logging.getLogger("fedkube")

EXIT_CONFIG = 2
EXIT_REFUSED = 3


def _tls_flags(parser: argparse.ArgumentParser) -> None:
    """--insecure, or --ca/--cert/--key for mTLS."""
    group = parser.add_argument_group("transport security (mTLS unless --insecure)")
    group.add_argument("--insecure", action="store_true", default=None,
                       help="plaintext gRPC; identities are not checked")
    group.add_argument("--ca", type=Path, help="CA certificate (PEM)")
    group.add_argument("--cert", type=Path, help="this party's certificate (PEM)")
    group.add_argument("--key", type=Path, help="this party's private key (PEM)")


def _tls_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    values = {"insecure": args.insecure, "ca": args.ca, "cert": args.cert, "key": args.key}
    chosen = {k: v for k, v in values.items() if v is not None}
    return chosen or None


def _options(pairs: Sequence[str]) -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--shard-option wants key=value, got {pair!r}")
        result[key] = value
    return result


def _shape(value: str) -> list[str]:
    try:
        return parse_shape(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


# -- director -----------------------------------------------------------------------------

def director_config(args: argparse.Namespace) -> DirectorConfig:
    config = build_config(DirectorConfig, args.config, {
        "host": args.host, "port": args.port, "data_dir": args.data_dir,
        "sample_shape": args.sample_shape, "target_shape": args.target_shape,
        "health_check_period": args.health_check_period, "tls": _tls_overrides(args),
        "metrics_port": args.metrics_port, "frontends": args.frontends,
        "bulk_port": args.bulk_port,
    })
    return config.model_copy(update={"bulk_port": None}) if args.no_bulk else config


def cmd_director_start(args: argparse.Namespace) -> int:
    from fedkube.director.server import DirectorServer

    config = director_config(args)

    async def main() -> None:
        server = DirectorServer(config)
        await server.serve_forever()

    from fedkube.eventloop import server_loop_factory

    with (contextlib.suppress(KeyboardInterrupt),
          asyncio.Runner(loop_factory=server_loop_factory()) as runner):
        runner.run(main())
    return 0


# -- envoy --------------------------------------------------------------------------------

def envoy_config(args: argparse.Namespace) -> EnvoyConfig:
    shard: dict[str, Any] | None = None
    if args.shard is not None or args.shard_option:
        shard = {"loader": args.shard or "digits", "options": _options(args.shard_option)}
    cuda = [int(i) for i in args.cuda_devices.split(",") if i] if args.cuda_devices else None
    return build_config(EnvoyConfig, args.config, {
        "name": args.name, "director": args.director, "shard": shard, "cuda_devices": cuda,
        "work_dir": args.work_dir, "tls": _tls_overrides(args),
    })


def _request_certificate(shard: str, role: str, *, cert: Path, key: Path,
                         lifetime_s: int | None = None) -> None:
    from fedkube.transport.shard_certificate import request_certificate

    request_certificate(shard, role, cert_path=cert, key_path=key, lifetime_s=lifetime_s)


def cmd_envoy_start(args: argparse.Namespace) -> int:
    from fedkube.envoy_agent.agent import EnvoyAgent, ShardRefused
    from fedkube.envoy_agent.runtimes import make_runtime
    from fedkube.tasks.shard import ShardLoaderError, load_shard

    config = envoy_config(args)
    try:
        shard = load_shard(config.shard.loader, dict(config.shard.options))
    except ShardLoaderError as exc:
        raise ConfigError(str(exc)) from exc
    renew: Callable[[], None] | None = None
    if config.tls.request_certificate:
        assert config.tls.cert and config.tls.key  # checked by TLSSettings
        renew = functools.partial(_request_certificate, config.name, "envoy",
                                  cert=config.tls.cert, key=config.tls.key,
                                  lifetime_s=config.tls.certificate_lifetime_s)
        renew()

    async def main() -> None:
        agent = EnvoyAgent(config, shard, runtime=make_runtime(config), renew_certificate=renew)
        # SIGTERM (a Pod deleted, a test's stop) unwinds like Ctrl-C: the running
        # collaborator is stopped with its envoy instead of left behind.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await agent.run()

    try:
        asyncio.run(main())
    except ShardRefused as exc:
        log.error("shard not accepted: %s", exc)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        pass
    return 0


# -- shards -------------------------------------------------------------------------------

def cmd_shards(args: argparse.Namespace) -> int:
    from fedkube.client import DirectorClient

    with DirectorClient.from_files(args.director, ca=args.ca, cert=args.cert, key=args.key,
                                   client_id=args.client_id) as client:
        if args.wait_online:
            envoys = client.wait_online(args.wait_online, timeout=args.timeout)
        else:
            envoys = client.envoys()
    if args.output == "json":
        print(json.dumps([vars(e) for e in envoys], indent=2))
        return 0
    from rich.console import Console

    from fedkube.ui import shards_table

    Console().print(shards_table(envoys))
    return 0


# -- collaborator -------------------------------------------------------------------------

def cmd_collaborator_run(args: argparse.Namespace) -> int:
    from fedkube.collaborator import environment
    from fedkube.collaborator.lifetime import bind_to_envoy
    from fedkube.collaborator.run import Collaborator, extract, fetch_archive
    from fedkube.tasks.archive import load_task
    from fedkube.tasks.shard import load_shard
    from fedkube.transport.tls import TLSFiles

    bind_to_envoy()
    renew: Callable[[], None] | None = None
    if args.request_certificate:
        if args.insecure or not (args.ca and args.cert and args.key):
            raise ConfigError("--request-certificate needs --ca/--cert/--key, not --insecure")
        renew = functools.partial(_request_certificate, args.name, "collaborator",
                                  cert=args.cert, key=args.key)
        renew()
    files = None if args.insecure else TLSSettings(ca=args.ca, cert=args.cert, key=args.key)
    tls = None if files is None else TLSFiles.load(files)
    archive = args.archive or fetch_archive(args.director, tls, args.experiment, args.name,
                                            args.work_dir / "archive.zip")
    plan, workspace = extract(archive, args.work_dir)
    venv_dir = args.work_dir / "venv"
    if plan.install_requirements and not environment.in_venv(venv_dir):
        try:
            python = environment.install_requirements(workspace, venv_dir)
        except environment.RequirementsError as exc:
            print(f"RequirementsError: {exc}", file=sys.stderr)
            return 1
        environment.reexec_in(python, venv_dir, sys.argv[1:])
    task = load_task(plan, workspace)
    shard = load_shard(args.shard, _options(args.shard_option))
    collaborator = Collaborator(target=args.director, experiment=args.experiment,
                                name=args.name, plan=plan, task=task, shard=shard, tls=tls,
                                certificate_files=files, renew_certificate=renew)
    try:
        collaborator.run()
    finally:
        collaborator.close()
    return 0


# -- experiments ---------------------------------------------------------------------------

def _client(args: argparse.Namespace) -> Any:
    from fedkube.client import DirectorClient

    return DirectorClient.from_files(args.director, ca=args.ca, cert=args.cert, key=args.key,
                                     client_id=args.client_id)


def _param(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param wants key=value, got {value!r}")
    try:
        parsed: Any = json.loads(raw)
    except json.JSONDecodeError:
        parsed = raw
    return key, parsed


def cmd_experiment(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return int(EXPERIMENT_ACTIONS[args.action](client, args))


def _submit(client: Any, args: argparse.Namespace) -> int:
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


def _list(client: Any, args: argparse.Namespace) -> int:
    rows = client.experiments()
    if args.output == "json":
        print(json.dumps([{"name": n, "status": s, "progress": p} for n, s, p in rows]))
    else:
        for name, status, progress in rows:
            print(f"{name:30} {status:12} {progress:6.0%}")
    return 0


def _status_json(status: Any) -> str:
    from dataclasses import asdict

    return json.dumps({**asdict(status), "round": status.round})


def _status(client: Any, args: argparse.Namespace) -> int:
    status = client.status(args.name)
    if args.output == "json":
        print(_status_json(status))
    else:
        print(f"{status.name}: {status.status}, round {status.round}/{status.total_rounds}"
              + (f", {status.metric} last {status.last_metrics} best {status.best_metrics}"
                 if status.metric else "")
              + (f", queued at {status.queue_position}" if status.queue_position else "")
              + (f"\nerror: {status.error}" if status.error else ""))
    return 0


def _wait(client: Any, args: argparse.Namespace) -> int:
    from fedkube.ui import wait_with_progress

    status = wait_with_progress(client, args.name, timeout=args.timeout)
    print(_status_json(status))
    return 0 if status.status == "finished" else 1


def _metrics(client: Any, args: argparse.Namespace) -> int:
    from dataclasses import asdict

    metrics = client.metrics(args.name)
    if args.output == "json":
        print(json.dumps([asdict(m) for m in metrics]))
    else:
        for m in metrics:
            print(f"round {m.round:4} {m.origin:16} {m.task:20} {m.name:10} {m.value:.4f}")
    return 0


def _plot(client: Any, args: argparse.Namespace) -> int:
    from fedkube.plot import plot_metrics

    metrics = client.metrics(args.name, follow=False)  # a running experiment: so far
    if not metrics:
        print(f"experiment {args.name} has no metrics yet", file=sys.stderr)
        return 1
    plot_metrics(metrics, args.out)
    print(f"metrics of {args.name} ({max(m.round for m in metrics) + 1} rounds) plotted "
          f"to {args.out}")
    return 0


def _model(client: Any, args: argparse.Namespace) -> int:
    import numpy as np

    model = client.model(args.name, best=not args.last)
    np.savez(args.out, **model)
    print(f"{'last' if args.last else 'best'} model of {args.name} written to {args.out}")
    return 0


def _remove(client: Any, args: argparse.Namespace) -> int:
    client.remove(args.name)
    print(f"experiment {args.name} removed")
    return 0


EXPERIMENT_ACTIONS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "submit": _submit, "list": _list, "status": _status, "wait": _wait, "metrics": _metrics,
    "model": _model, "plot": _plot, "remove": _remove,
}


# -- dev cluster --------------------------------------------------------------------------

def cmd_dev_cluster_up(args: argparse.Namespace) -> int:
    """The tests' control plane by hand: runs in the foreground until Ctrl-C."""
    import signal
    import threading

    from fedkube.devcluster import ControlPlane

    plane = ControlPlane(args.dir.resolve())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        plane.start()
        print(f"export KUBECONFIG={plane.kubeconfig}\n"
              f"kubectl is at {plane.bin_dir / 'kubectl'}; Ctrl-C stops the cluster",
              flush=True)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        plane.stop()
    return 0


# -- operator -----------------------------------------------------------------------------

def cmd_operator_run(args: argparse.Namespace) -> int:
    from fedkube.operator.run import run_operator

    run_operator(args.namespace, liveness_port=args.liveness_port,
                 metrics_port=args.metrics_port)
    return 0


# -- CRDs ---------------------------------------------------------------------------------

def cmd_crds(args: argparse.Namespace) -> int:
    from fedkube.api.crds import write_crds

    for directory in args.out or [Path("crds")]:
        for path in write_crds(directory):
            print(path)
    if args.reference:
        from fedkube.api.reference import reference_markdown

        args.reference.write_text(reference_markdown())
        print(args.reference)
    return 0


# -- certs --------------------------------------------------------------------------------

def cmd_certs(args: argparse.Namespace) -> int:
    from fedkube.transport import certs

    ca = certs.load_or_create_ca(args.out)
    made = []
    if args.director:
        made.append(certs.write_pair(args.out, "director",
                                     certs.issue(ca, args.director,
                                                 hosts=["localhost", "127.0.0.1", *args.san],
                                                 role="director")))
    for role, names in (("envoy", args.envoy), ("owner", args.user), ("admin", args.admin),
                        ("collaborator", args.collaborator)):
        for name in names:
            made.append(certs.write_pair(args.out, name, certs.issue(ca, name, role=role)))
    print(f"CA: {args.out / 'ca.crt'}")
    for cert, key in made:
        print(f"{cert}  {key}")
    return 0


# -- demo ---------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from fedkube.demo import run_demo

    return run_demo(envoys=args.envoys, rounds=args.rounds, non_iid=args.non_iid,
                    out_dir=args.out, as_json=args.json)


# -- parser -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedkube", description=__doc__)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="auto", choices=["auto", "rich", "plain", "json"])
    commands = parser.add_subparsers(dest="command", required=True)

    director = commands.add_parser("director", help="run the director").add_subparsers(
        dest="action", required=True)
    start = director.add_parser("start", help="start a director")
    start.add_argument("--host")
    start.add_argument("--port", type=int)
    start.add_argument("--data-dir", type=Path)
    start.add_argument("--sample-shape", type=_shape)
    start.add_argument("--target-shape", type=_shape)
    start.add_argument("--health-check-period", type=float, help="seconds")
    start.add_argument("--metrics-port", type=int,
                       help="serve Prometheus /metrics on this port (0: any free port)")
    bulk = start.add_mutually_exclusive_group()
    bulk.add_argument("--bulk-port", type=int, help=(
        "port for model transfers over a plain (or TLS) socket, faster than gRPC streams "
        "(default: any free port; collaborators ask the director where)"))
    bulk.add_argument("--no-bulk", action="store_true",
                      help="no bulk port: models travel in gRPC streams only")
    start.add_argument("--frontends", type=int, help=(
        "processes that share the port and answer health checks (default 0): one more "
        "core's worth of health checks each, for many thousands of envoys"))
    start.add_argument("--config", type=Path, help="director.yaml")
    _tls_flags(start)
    start.set_defaults(func=cmd_director_start, moves_models=True)

    envoy = commands.add_parser("envoy", help="run an envoy").add_subparsers(
        dest="action", required=True)
    start = envoy.add_parser("start", help="start an envoy")
    start.add_argument("--name")
    start.add_argument("--director", help="host:port")
    start.add_argument("--shard", help="shard loader: 'digits' or package.module:Class")
    start.add_argument("--shard-option", action="append", default=[], metavar="KEY=VALUE")
    start.add_argument("--cuda-devices", help="comma-separated GPU indices this envoy owns "
                       "(default: every GPU its environment shows)")
    start.add_argument("--work-dir", type=Path)
    start.add_argument("--config", type=Path, help="envoy.yaml")
    _tls_flags(start)
    start.set_defaults(func=cmd_envoy_start)

    shards = commands.add_parser("shards", help="list the director's registry of shards")
    shards.add_argument("--director", required=True, help="host:port")
    shards.add_argument("--output", choices=["table", "json"], default="table")
    shards.add_argument("--client-id", default="owner")
    shards.add_argument("--wait-online", type=int, default=0, metavar="N",
                        help="first wait until at least N shards are online")
    shards.add_argument("--timeout", type=float, default=300, help="seconds, for --wait-online")
    _tls_flags(shards)
    shards.set_defaults(func=cmd_shards)

    collaborator = commands.add_parser("collaborator", help="run a collaborator (envoys do)")
    run = collaborator.add_subparsers(dest="action", required=True).add_parser("run")
    run.add_argument("--director", required=True)
    run.add_argument("--experiment", required=True)
    run.add_argument("--name", required=True)
    run.add_argument("--archive", type=Path,
                     help="the experiment archive (default: download it from the director)")
    run.add_argument("--work-dir", type=Path, required=True)
    run.add_argument("--shard", default="digits")
    run.add_argument("--shard-option", action="append", default=[])
    _tls_flags(run)
    run.add_argument("--request-certificate", action="store_true",
                     help="on Kubernetes: first request the shard's certificate from the "
                     "operator, writing it to --cert/--key")
    run.set_defaults(func=cmd_collaborator_run, moves_models=True)

    experiment = commands.add_parser("experiment", help="submit and follow experiments")
    actions = experiment.add_subparsers(dest="action", required=True)
    for action in EXPERIMENT_ACTIONS:
        sub = actions.add_parser(action)
        sub.add_argument("--director", required=True, help="host:port")
        sub.add_argument("--client-id", default="owner")
        _tls_flags(sub)
        if action == "submit":
            sub.add_argument("--name", required=True)
        elif action != "list":
            sub.add_argument("name")
        if action in ("list", "status", "metrics"):
            sub.add_argument("--output", choices=["table", "json"], default="table")
        sub.set_defaults(func=cmd_experiment)
    actions.choices["plot"].add_argument("--out", type=Path, required=True,
                                         help="PNG file to write")
    submit = actions.choices["submit"]
    submit.add_argument("--task", help="digits-logreg, digits-mlp (default), or with --archive")
    submit.add_argument("--archive", type=Path, help="a Python module with init_model, "
                                                     "train and validate")
    submit.add_argument("--requirements", type=Path, help="a requirements.txt that each "
                        "envoy installs into a virtualenv of this experiment")
    submit.add_argument("--rounds", type=int, default=10)
    submit.add_argument("--min-collaborators", type=int)
    submit.add_argument("--round-timeout", type=float, default=600.0)
    submit.add_argument("--collaborators", help="comma-separated shard names (default: all "
                                                "online)")
    submit.add_argument("--param", type=_param, action="append", default=[], metavar="K=V")
    actions.choices["wait"].add_argument("--timeout", type=float, default=3600)
    model = actions.choices["model"]
    model.add_argument("--out", type=Path, required=True, help="an .npz file")
    kind = model.add_mutually_exclusive_group()
    kind.add_argument("--best", action="store_true", default=True)
    kind.add_argument("--last", action="store_true")

    dev = commands.add_parser("dev", help="developer tools").add_subparsers(
        dest="tool", required=True)
    cluster = dev.add_parser("cluster", help="a local Kubernetes control plane with fake "
                                             "GPU nodes").add_subparsers(dest="action",
                                                                         required=True)
    up = cluster.add_parser("up", help="start it in the foreground (Ctrl-C stops it)")
    up.add_argument("--dir", type=Path, default=Path(".fedkube-cluster"))
    up.set_defaults(func=cmd_dev_cluster_up)

    operator = commands.add_parser("operator", help="the Kubernetes operator").add_subparsers(
        dest="action", required=True)
    run_op = operator.add_parser("run", help="reconcile Federations, Shards and Experiments "
                                             "(kubeconfig or in-cluster credentials)")
    run_op.add_argument("--namespace", action="append", default=[],
                        help="watch only this namespace (repeatable; default: all)")
    run_op.add_argument("--liveness-port", type=int, help="serve /healthz on this port")
    run_op.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics here")
    run_op.set_defaults(func=cmd_operator_run)

    crds = commands.add_parser("crds", help="write the CustomResourceDefinitions (YAML)")
    crds.add_argument("--out", type=Path, action="append",
                      help="directory to write (repeatable; default: crds)")
    crds.add_argument("--reference", type=Path, help="also write the Markdown reference here")
    crds.set_defaults(func=cmd_crds)

    certs = commands.add_parser("certs", help="create a CA and mTLS certificates")
    certs.add_argument("--out", type=Path, required=True, help="directory for PEM files")
    certs.add_argument("--director", metavar="HOST", help="issue the director's certificate")
    certs.add_argument("--san", action="append", default=[], help="extra director host names")
    certs.add_argument("--envoy", action="append", default=[], metavar="NAME")
    certs.add_argument("--user", action="append", default=[], metavar="NAME",
                       help="a model owner's client certificate (sees its own experiments)")
    certs.add_argument("--admin", action="append", default=[], metavar="NAME",
                       help="an admin's client certificate (sees every experiment)")
    certs.add_argument("--collaborator", action="append", default=[], metavar="NAME",
                       help="a collaborator-only certificate for shard NAME (aggregator "
                            "calls and the experiment archive, nothing else)")
    certs.set_defaults(func=cmd_certs)

    demo = commands.add_parser("demo", help="a whole federation on this machine")
    demo.add_argument("--envoys", type=int, default=3)
    demo.add_argument("--rounds", type=int, default=20)
    demo.add_argument("--non-iid", action="store_true")
    demo.add_argument("--out", type=Path, default=Path("demo-output"))
    demo.add_argument("--json", action="store_true", help="end with one JSON object")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fedkube.logs import setup_logging

    args = build_parser().parse_args(argv)
    if getattr(args, "moves_models", False):
        from fedkube.memory import reexec_with_huge_pages

        reexec_with_huge_pages(sys.argv[1:] if argv is None else list(argv))
    setup_logging(args.log_level, args.log_format)
    func: Callable[[argparse.Namespace], int] = args.func
    import grpc

    try:
        return func(args)
    except ConfigError as exc:
        print(f"fedkube: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except CertificateRefused as exc:
        print(f"fedkube: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except TimeoutError as exc:
        print(f"fedkube: timed out: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:  # a refusal or an unreachable director: one clear line
        print(f"fedkube: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1


if __name__ == "__main__":
    sys.exit(main())
