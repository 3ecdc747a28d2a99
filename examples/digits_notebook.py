"""The Python API as a notebook would use it: submit, follow, fetch, score.

    python examples/digits_notebook.py --director localhost:50051 --insecure
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedkube.api.plan import Plan
from fedkube.client import DirectorClient, experiment_archive
from fedkube.tasks import digits
from fedkube.tasks.models import BUILTIN_TASKS
from fedkube.transport.tls import TLSFiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--director", default="localhost:50051")
    parser.add_argument("--name", default="digits-notebook")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--certs", type=Path, help="directory of `fedkube certs` output")
    parser.add_argument("--user", default="alice", help="certificate name (with --certs)")
    args = parser.parse_args()
    tls = None if args.insecure else TLSFiles.from_dir(args.certs, args.user)

    with DirectorClient(args.director, tls=tls, client_id=args.user) as client:
        shards = [e.name for e in client.wait_online(1, timeout=120) if e.online]
        print(f"shards online: {shards}")
        plan = Plan(task="digits-logreg", rounds=args.rounds,
                    params={"learning_rate": 1.0, "epochs": 1})
        archive, initial_model = experiment_archive(plan)
        client.submit(args.name, archive, collaborators=shards, initial_model=initial_model)

        def show(status: object) -> None:
            print(f"  {status.status:12} round {status.round}/{status.total_rounds} "  # type: ignore[attr-defined]
                  f"{status.last_metrics}")  # type: ignore[attr-defined]

        final = client.wait(args.name, timeout=600, interval=1.0, on_update=show)
        print(f"{args.name}: {final.status}, best {final.best_metrics}")
        best = client.model(args.name)
    # Score the federated model on digits no shard has seen.
    accuracy = BUILTIN_TASKS["digits-logreg"].validate(best, digits.test_set(), {})["accuracy"]
    print(f"held-out accuracy of the best model: {accuracy:.4f}")


if __name__ == "__main__":
    main()
