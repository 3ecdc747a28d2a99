"""Rich renderings shared by the CLI and the demo."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.table import Table

from fedkube.client import EnvoyView


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
