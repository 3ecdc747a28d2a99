"""`fedkube demo` and `fedkube dev cluster up`: a federation or a control plane on this
machine."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    cluster = dev.add_parser("cluster", help="a local Kubernetes control plane with fake "
                                             "GPU nodes").add_subparsers(dest="action",
                                                                         required=True)
    up = cluster.add_parser("up", help="start it in the foreground (Ctrl-C stops it)")
    up.add_argument("--dir", type=Path, default=Path(".fedkube-cluster"),
                    help="the control plane's state and logs")
    up.set_defaults(func=cluster_up)


def run_demo(args: argparse.Namespace) -> int:
    from fedkube.dev.demo import run_demo

    return run_demo(envoys=args.envoys, rounds=args.rounds, non_iid=args.non_iid,
                    out_dir=args.out, as_json=args.json)


def cluster_up(args: argparse.Namespace) -> int:
    """The tests' control plane by hand: runs in the foreground until Ctrl-C."""
    import signal
    import threading

    from fedkube.dev.cluster import ControlPlane

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
