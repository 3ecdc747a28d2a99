"""`fedkube demo`: a whole federation on this machine, each part a real process.

A director and N envoys (each guarding a shard of scikit-learn's digits) start as separate
`fedkube` processes on loopback; a `digits-logreg` experiment runs R rounds of FedAvg;
the demo then scores the models on held-out digits beside a centralized baseline (the
same model trained on the union of the shards for the same number of epochs), writes a
metrics plot and the models, and prints a summary.

Its final accuracy is one figure everywhere it is shown: the last round's aggregated model
on the held-out digits (the progress bar's figure, by contrast, is labelled as the
validation on the shards' own data).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from rich.live import Live
from rich.table import Table

from fedkube.api.plan import Plan
from fedkube.client import DirectorClient, EnvoyView, experiment_archive
from fedkube.client.plot import plot_metrics
from fedkube.client.ui import (
    best_round,
    console_for,
    shards_table,
    wait_with_progress,
)
from fedkube.dev.processes import Process, director_process, envoy_process, free_port, wait_for
from fedkube.tasks import digits
from fedkube.tasks.models import BUILTIN_TASKS

console = console_for(stderr=True)
TASK = "digits-logreg"
EXPERIMENT = "digits-demo"
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
                # Transient: the registry's last frame is printed once, whole, below it,
                # and the progress bar starts on a line of its own.
                with Live(shards_table([]), console=console, refresh_per_second=4,
                          transient=True) as live:
                    def all_online() -> bool:
                        rows = _registry(client)
                        live.update(shards_table(rows))
                        return len(rows) == envoys and all(r.online for r in rows)

                    wait_for(all_online, timeout=120, interval=0.25, message="envoys online")
                console.print(shards_table(_registry(client)))
                plan = Plan(task=TASK, params=PARAMS, rounds=rounds, round_timeout_s=120)
                archive, initial = experiment_archive(plan)
                client.submit(EXPERIMENT, archive, initial_model=initial)
                status = wait_with_progress(client, EXPERIMENT, timeout=600, console=console)
                if status.status != "finished":
                    console.print(f"[red]experiment {status.status}: {status.error}")
                    return 1
                best, last = client.model(EXPERIMENT), client.model(EXPERIMENT, best=False)
                metrics = client.metrics(EXPERIMENT)
        finally:
            for process in processes:
                process.stop()
            (out_dir / "logs").mkdir(exist_ok=True)
            for process in processes:
                (out_dir / "logs" / f"{process.name}.log").write_text(process.output())
    task = BUILTIN_TASKS[TASK]
    test = digits.test_set()
    final = task.validate(last, test, PARAMS)["accuracy"]  # the final accuracy
    federated = task.validate(best, test, PARAMS)["accuracy"]
    centralized = centralized_accuracy(rounds, envoys, non_iid)
    chosen = best_round(metrics, status.metric, status.best_metrics.get(status.metric, -1.0))
    np.savez(out_dir / "best_model.npz", **best)  # type: ignore[arg-type]
    np.savez(out_dir / "last_model.npz", **last)  # type: ignore[arg-type]
    plot_metrics(metrics, out_dir / "metrics.png", experiment=EXPERIMENT,
                 baseline=centralized, baseline_label="centralized baseline, held-out digits")
    seconds = round(time.monotonic() - started, 2)
    # One final accuracy: the last round's aggregated model on the held-out digits; the
    # best round's model (chosen by validation on the shards) is labelled as such.
    summary = {"final_accuracy": round(final, 4),
               "best_round_accuracy": round(federated, 4), "best_round": chosen,
               "centralized_accuracy": round(centralized, 4),
               "rounds": rounds, "envoys": envoys, "non_iid": non_iid,
               "seconds": seconds, "out_dir": str(out_dir)}
    console.print(summary_table(summary, test_size=len(test[1])))
    console.print(f"final accuracy (the last round's aggregated model on the held-out "
                  f"digits): {final:.2%}; centralized baseline {centralized:.2%}")
    console.print(f"plot: {out_dir / 'metrics.png'}; models and logs in {out_dir}; "
                  f"{seconds} s")
    if as_json:
        print(json.dumps(summary))
    return 0


def summary_table(summary: Mapping[str, object], *, test_size: int) -> Table:
    """The demo's result: each model's accuracy on the same held-out digits."""
    rounds, best = summary["rounds"], summary["best_round"]
    table = Table(title=f"digits, {summary['envoys']} envoys, {rounds} rounds of FedAvg "
                        f"({'non-IID' if summary['non_iid'] else 'IID'})")
    table.add_column("model")
    table.add_column(f"accuracy on {test_size} held-out digits", justify="right")
    table.add_row(f"federated, last round ({rounds}): final accuracy",
                  f"{summary['final_accuracy']:.2%}")
    chosen = f"round {best}" if best is not None else "best round"
    table.add_row(f"federated, {chosen} (best validation on the shards)",
                  f"{summary['best_round_accuracy']:.2%}")
    table.add_row(f"centralized baseline ({rounds} epochs on the shards' union)",
                  f"{summary['centralized_accuracy']:.2%}")
    return table
