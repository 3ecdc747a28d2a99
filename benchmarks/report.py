"""How every benchmark reports: a rich table for people and, with --json, one JSON object
on stdout, `{"benchmark", "machine", "results", ...}`, which `benchmarks.plot` draws.
Under --json the table goes to stderr, so stdout holds the object alone."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def console(as_json: bool, width: int | None = None) -> Console:
    return Console(stderr=as_json, width=width)


def machine() -> dict[str, Any]:
    """What the figures were measured on: they only compare within one machine."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), "")
    return {"cpus": os.cpu_count(), "cpu": model, "python": platform.python_version()}


def emit(benchmark: str, results: Any, **extra: Any) -> None:
    print(json.dumps({"benchmark": benchmark, "machine": machine(), "results": results,
                      **extra}))


def report(benchmark: str, title: str, columns: Sequence[str],
           rows: Iterable[Sequence[str]], results: Any, *, as_json: bool) -> None:
    """A table of right-aligned columns, then, with --json, the results as one object."""
    view = Table(title=title)
    for column in columns:
        view.add_column(column, justify="right")
    for row in rows:
        view.add_row(*row)
    console(as_json).print(view)
    if as_json:
        emit(benchmark, results)
