"""`fedkube demo` and `fedkube dev cluster up|env|status|down`: a federation or a
Kubernetes control plane on this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedkube.api.errors import ServiceError

if TYPE_CHECKING:
    from fedkube.dev.devcluster import DevCluster


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser("demo", help="a whole federation on this machine")
    demo.add_argument("--envoys", type=int, default=3, metavar="N",
                      help="envoy processes, each on its share of the digits")
    demo.add_argument("--rounds", type=int, default=20, metavar="N", help="federated rounds")
    demo.add_argument("--non-iid", action="store_true",
                      help="give each envoy a skewed mix of digits")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), metavar="DIR",
                      help="where the plot, models and logs go")
    demo.add_argument("--json", action="store_true", help="end with one JSON object")
    demo.set_defaults(func=run_demo)

    dev = commands.add_parser("dev", help="developer tools").add_subparsers(
        dest="tool", required=True)
    cluster = dev.add_parser(
        "cluster", help="a local Kubernetes control plane with fake GPU nodes (KWOK)",
        description="etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok "
                    "on loopback,\nwith fake nodes gpu-node-1 (8 GPUs), gpu-node-2 (4) and "
                    "cpu-node-1 that run no\ncontainers: run the operator, director and "
                    "envoys beside it as local processes\n(docs/quickstart.md, section 4). "
                    "Binaries from $KUBEBUILDER_ASSETS, else built once\nfrom Go modules "
                    "(tools/k8s-testenv/build.sh)."
    ).add_subparsers(dest="action", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--dir", type=Path, default=Path(".fedkube-cluster"),
                       help="the cluster's state, kubeconfig and logs")
    up = cluster.add_parser(
        "up", parents=[where],
        help="start it in the background (or find it running); prints `export` lines "
             "for KUBECONFIG and a PATH with its kubectl and helm",
        description="Starts the cluster in the background, unless it runs already, and "
                    "prints on\nstdout the `export` lines that point kubectl and helm at it "
                    "(progress goes to\nstderr): eval \"$(fedkube dev cluster up)\". Each "
                    "start is a fresh cluster; `down`\nstops it.")
    up.add_argument("--foreground", action="store_true",
                    help="stay in the foreground; Ctrl-C stops the cluster")
    up.set_defaults(func=cluster_up)
    env = cluster.add_parser("env", parents=[where],
                             help="print the `export` lines of the running cluster again")
    env.set_defaults(func=cluster_env)
    status = cluster.add_parser("status", parents=[where],
                                help="each component's process, and the nodes (exit 1 when "
                                     "it is not running)")
    status.set_defaults(func=cluster_status)
    down = cluster.add_parser("down", parents=[where], help="stop it")
    down.add_argument("--clean", action="store_true",
                      help="also remove --dir (its logs and kubeconfig)")
    down.set_defaults(func=cluster_down)


def run_demo(args: argparse.Namespace) -> int:
    from fedkube.dev.demo import run_demo

    return run_demo(envoys=args.envoys, rounds=args.rounds, non_iid=args.non_iid,
                    out_dir=args.out, as_json=args.json)


def cluster_up(args: argparse.Namespace) -> int:
    from fedkube.dev.devcluster import say, start, stop

    work = args.dir.resolve()
    cluster, started = start(work)
    if not started:
        say(f"the dev cluster in {work} is running already ({cluster.server})")
    print(cluster.exports(), end="", flush=True)
    if sys.stdout.isatty():
        say("paste those lines into your shell, or next time: "
            "eval \"$(fedkube dev cluster up)\"")
    if not args.foreground:
        say("`fedkube dev cluster status` shows it, `fedkube dev cluster down` stops it")
        return 0
    say("in the foreground: Ctrl-C stops the cluster")
    import signal
    import threading

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        while not stopping.wait(1.0):
            if not cluster.running:
                gone = [c.name for c in cluster.components if not c.running]
                say(f"fedkube: {', '.join(gone)} exited; see {work / 'logs'}")
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        stop(work)
    return 0


def _running(work: Path) -> DevCluster:
    from fedkube.dev.devcluster import DevCluster

    cluster = DevCluster.load(work)
    if cluster is None or not cluster.running:
        flag = "" if work == Path(".fedkube-cluster").resolve() else f" --dir {work}"
        raise ServiceError(f"no dev cluster runs in {work}; `fedkube dev cluster up{flag}` "
                           "starts one")
    return cluster


def cluster_env(args: argparse.Namespace) -> int:
    print(_running(args.dir.resolve()).exports(), end="")
    return 0


def cluster_status(args: argparse.Namespace) -> int:
    from fedkube.dev.devcluster import DevCluster, status_table

    work = args.dir.resolve()
    cluster = DevCluster.load(work)
    if cluster is not None:
        print(status_table(cluster), end="")
    _running(work)
    return 0


def cluster_down(args: argparse.Namespace) -> int:
    import shutil

    from fedkube.dev.devcluster import say, stop

    work = args.dir.resolve()
    stopped = stop(work)
    say(f"stopped {', '.join(stopped)}" if stopped else f"no dev cluster runs in {work}")
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)
    return 0
