"""`fedkube shards`: the director's registry of shards."""

from __future__ import annotations

import argparse
import json

from fedkube.cli.experiment import OUTPUT_HELP, OUTPUTS
from fedkube.cli.options import add_client_flags, director_client


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    shards = commands.add_parser("shards", help="list the director's registry of shards",
                                 description="The shards registered with the director: "
                                             "online or not, their shapes, GPUs and "
                                             "experiment.")
    add_client_flags(shards)
    shards.add_argument("--output", choices=OUTPUTS, default="table", help=OUTPUT_HELP)
    shards.add_argument("--wait-online", type=int, default=0, metavar="N",
                        help="first wait until at least N shards are online")
    shards.add_argument("--timeout", type=float, default=300, metavar="SECONDS",
                        help="how long --wait-online waits (exit 4 after it)")
    shards.set_defaults(func=list_shards)


def list_shards(args: argparse.Namespace) -> int:
    with director_client(args) as client:
        if args.wait_online:
            envoys = client.wait_online(args.wait_online, timeout=args.timeout)
        else:
            envoys = client.envoys()
    if args.output == "json":
        print(json.dumps([vars(e) for e in envoys], indent=2))
        return 0
    from fedkube.client.ui import SHARD_COLUMNS, print_table, shard_rows

    print_table(SHARD_COLUMNS, shard_rows(envoys), wide=args.output == "wide",
                title="Shards registered with the director")
    return 0
