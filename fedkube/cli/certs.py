"""`fedkube certs`: a CA and mTLS certificates, the role of each in its OU."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = commands.add_parser("certs", help="create a CA and mTLS certificates")
    certs.add_argument("--out", type=Path, required=True, help="directory for PEM files")
    certs.add_argument("--director", metavar="HOST", help="issue the director's certificate")
    certs.add_argument("--san", action="append", default=[], help="extra director host names")
    certs.add_argument("--envoy", action="append", default=[], metavar="NAME",
                       help="an envoy's certificate for shard NAME, repeatable")
    certs.add_argument("--user", action="append", default=[], metavar="NAME",
                       help="a model owner's client certificate (sees its own experiments)")
    certs.add_argument("--admin", action="append", default=[], metavar="NAME",
                       help="an admin's client certificate (sees every experiment)")
    certs.add_argument("--collaborator", action="append", default=[], metavar="NAME",
                       help="a collaborator-only certificate for shard NAME (aggregator "
                            "calls and the experiment archive, nothing else)")
    certs.set_defaults(func=make_certificates)


def make_certificates(args: argparse.Namespace) -> int:
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
