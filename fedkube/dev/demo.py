"""`fedkube demo`: a whole federation on this machine, each part a real process.

A director and N envoys (each guarding a shard of scikit-learn's digits) start as separate
`fedkube` processes on loopback; a `digits-logreg` experiment runs R rounds of FedAvg;
the demo then scores the best model on held-out digits beside a centralized baseline (the
same model trained on the union of the shards for the same number of epochs), writes a
metrics plot and the models, and prints a summary.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fedkube.api.plan import Plan
from fedkube.client import DirectorClient, EnvoyView, experiment_archive
from fedkube.client.plot import plot_metrics
from fedkube.client.ui import shards_table, wait_with_progress
from fedkube.dev.processes import Process, director_process, envoy_process, free_port, wait_for
from fedkube.tasks import digits
from fedkube.tasks.models import BUILTIN_TASKS

console = Console(stderr=True)
TASK = "digits-logreg"
PARAMS = {"epochs": 1, "learning_rate": 1.0, "batch_size": 32}


def _registry(client: DirectorClient) -> list[EnvoyView]:
    try:
        return client.envoys()
    except Exception:  # the director is still starting
        return []


def centralized_accuracy(rounds: int, envoys: int, non_iid: bool) -> float:
    """The same model trained on the union of the shards' training data, one epoch per
    round (what FedAvg saw in total), scored on the same held-out digits."""
    task = BUILTIN_TASKS[TASK]
    model = task.init_model(PARAMS)
    parts = [digits.DigitsShard(i, envoys, non_iid).get_dataset("train") for i in range(envoys)]
    data = (np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]))
    for r in range(rounds):
        model, _ = task.train(model, data, {**PARAMS, "seed": r})
    return task.validate(model, digits.test_set(), PARAMS)["accuracy"]


def run_demo(*, envoys: int, rounds: int, non_iid: bool, out_dir: Path, as_json: bool) -> int:
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedkube-demo-") as tmp:
        work, port = Path(tmp), free_port()
        processes: list[Process] = [director_process(work, port, period=2.0).start()]
        extra = ["--shard-option", "non_iid=true"] if non_iid else []
        processes += [envoy_process(work, f"envoy-{i + 1}", port, index=i, count=envoys,
                                    extra=extra).start() for i in range(envoys)]
        try:
            with DirectorClient(f"localhost:{port}", client_id="demo-owner") as client:
                with Live(shards_table([]), console=console, refresh_per_second=4) as live:
                    def all_online() -> bool:
                        rows = _registry(client)
                        live.update(shards_table(rows))
                        return len(rows) == envoys and all(r.online for r in rows)

                    wait_for(all_online, timeout=120, interval=0.25, message="envoys online")
                plan = Plan(task=TASK, params=PARAMS, rounds=rounds, round_timeout_s=120)
                archive, initial = experiment_archive(plan)
                client.submit("digits-demo", archive, initial_model=initial)
                status = wait_with_progress(client, "digits-demo", timeout=600)
                if status.status != "finished":
                    console.print(f"[red]experiment {status.status}: {status.error}")
                    return 1
                best, last = client.model("digits-demo"), client.model("digits-demo", best=False)
                metrics = client.metrics("digits-demo")
        finally:
            for process in processes:
                process.stop()
            (out_dir / "logs").mkdir(exist_ok=True)
            for process in processes:
                (out_dir / "logs" / f"{process.name}.log").write_text(process.output())
    task = BUILTIN_TASKS[TASK]
    test = digits.test_set()
    federated = task.validate(best, test, PARAMS)["accuracy"]
    final = task.validate(last, test, PARAMS)["accuracy"]
    centralized = centralized_accuracy(rounds, envoys, non_iid)
    np.savez(out_dir / "best_model.npz", **best)  # type: ignore[arg-type]
    np.savez(out_dir / "last_model.npz", **last)  # type: ignore[arg-type]
    plot_metrics(metrics, out_dir / "metrics.png")
    seconds = round(time.monotonic() - started, 2)
    summary = {"federated_accuracy": round(federated, 4),
               "federated_last_accuracy": round(final, 4),
               "centralized_accuracy": round(centralized, 4), "rounds": rounds,
               "envoys": envoys, "non_iid": non_iid, "seconds": seconds,
               "out_dir": str(out_dir)}
    table = Table(title=f"digits, {envoys} envoys, {rounds} rounds of FedAvg "
                        f"({'non-IID' if non_iid else 'IID'})")
    table.add_column("model")
    table.add_column("held-out accuracy", justify="right")
    table.add_row("federated (best round)", f"{federated:.2%}")
    table.add_row("federated (last round)", f"{final:.2%}")
    table.add_row("centralized baseline", f"{centralized:.2%}")
    console.print(table)
    console.print(f"plot: {out_dir / 'metrics.png'}; models and logs in {out_dir}; "
                  f"{seconds} s")
    if as_json:
        print(json.dumps(summary))
    return 0
