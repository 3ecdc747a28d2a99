"""`fedkube shard pending|approve|refuse`: the data owner's answer on experiments that the
shard policy leaves to them (`approval: manual`), given on the envoy's machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedkube.envoy_agent import approvals


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    shard = commands.add_parser(
        "shard", help="answer experiments waiting for this shard's data owner").add_subparsers(
        dest="action", required=True)
    listing = shard.add_parser("pending", help="the experiments waiting for your answer")
    listing.add_argument("--output", choices=["table", "json"], default="table",
                         help="table for people, json for scripts")
    approve = shard.add_parser("approve", help="let an experiment run on this shard")
    refuse = shard.add_parser("refuse", help="refuse an experiment (its owner sees why)")
    for parser in (listing, approve, refuse):
        parser.add_argument("--work-dir", type=Path, required=True,
                            help="the envoy's work directory (its --work-dir)")
    for parser in (approve, refuse):
        parser.add_argument("experiment", help="the experiment's name, as `pending` lists it")
    approve.add_argument("--reason", default="", help="shown to the experiment's owner")
    refuse.add_argument("--reason", required=True, help="shown to the experiment's owner")
    listing.set_defaults(func=list_pending)
    approve.set_defaults(func=lambda args: _answer(args, "accepted"))
    refuse.set_defaults(func=lambda args: _answer(args, "refused"))


def list_pending(args: argparse.Namespace) -> int:
    waiting = approvals.pending(args.work_dir)
    if args.output == "json":
        print(json.dumps(waiting, indent=2))
        return 0
    if not waiting:
        print("no experiment is waiting for approval")
        return 0
    columns = ("experiment", "owner", "task", "rounds", "gpus", "user_code", "requirements")
    rows = [[str(item.get(c, "")) for c in columns] for item in waiting]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    for row in [[c.upper() for c in columns], *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


def _answer(args: argparse.Namespace, decision: str) -> int:
    approvals.answer(args.work_dir, args.experiment, decision, args.reason)
    print(f"experiment {args.experiment}: {'approved' if decision == 'accepted' else 'refused'}")
    return 0
