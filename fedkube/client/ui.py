"""Rich renderings shared by the CLI and the demo."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.table import Table

from fedkube.client import DirectorClient, EnvoyView, ExperimentView


def _ago(stamp: float) -> str:
    if stamp <= 0:
        return "never"
    seconds = max(0.0, time.time() - stamp)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def shards_table(envoys: Sequence[EnvoyView]) -> Table:
    table = Table(title="Shards registered with the director")
    for column in ("NAME", "ONLINE", "SAMPLES", "SHAPES", "CUDA DEVICES", "EXPERIMENT",
                   "LAST HEALTH CHECK", "DESCRIPTION"):
        table.add_column(column)
    for envoy in envoys:
        gpus = ", ".join(f"{d['index']}:{d['name']}" for d in envoy.cuda_devices) or "-"
        table.add_row(
            envoy.name, "[green]yes[/]" if envoy.online else "[red]no[/]",
            str(envoy.n_samples),
            f"{'x'.join(envoy.sample_shape)} -> {'x'.join(envoy.target_shape)}", gpus,
            envoy.experiment or "-", _ago(envoy.last_health_check), envoy.description)
    return table


def wait_with_progress(client: DirectorClient, name: str, *, timeout: float
                       ) -> ExperimentView:
    """Waits for an experiment with a rich progress bar by round."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(stderr=True)
    # A bar on a terminal only: piped, its last frame would be noise on stderr.
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[detail]}"), console=console,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task(name, total=None, detail="")

        def update(status: ExperimentView) -> None:
            detail = status.status
            if status.queue_position:
                detail += f" (queued, position {status.queue_position})"
            if status.awaiting_approval:
                detail += f" (awaiting approval from {', '.join(status.awaiting_approval)})"
            if status.last_metrics:
                detail += "  " + "  ".join(f"{k} {v:.4f}" for k, v in status.last_metrics.items())
            bar.update(task, total=status.total_rounds or None, completed=status.round,
                       detail=detail)

        return client.wait(name, timeout=timeout, on_update=update)
