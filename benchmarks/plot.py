"""Draws the figures of benchmark runs: each file is one run's `--json` object
(`python -m benchmarks.<name> ... --json > run.json`), drawn as `<file stem>.png`. The
recorded runs behind docs/benchmarks.md are in docs/benchmarks/, their plots beside them:

    python -m benchmarks.plot docs/benchmarks/*.json --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

Rows = list[dict[str, Any]]


def _machine(run: dict[str, Any]) -> str:
    machine = run.get("machine", {})
    return f"{machine.get('cpus', '?')} cores" + (f", {run['note']}" if run.get("note") else "")


def health_checks(run: dict[str, Any]) -> Figure:
    """Registrations/s per director and load; served calls/s against their p99."""
    rows: Rows = run["results"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['director']}\n{r['envoys']:,} x {r['period_s']:g} s" for r in rows]
    left.bar(range(len(rows)), [r["registration_per_s"] for r in rows],
             color=["tab:gray" if r["director"] in ("openfl", "grpc-floor") else "tab:blue"
                    for r in rows])
    left.set_xticks(range(len(rows)), labels, fontsize=7)
    left.set(title="registrations per second", ylabel="shards/s")
    for r in rows:
        errors = f", {r['errors']} errors" if r["errors"] else ""
        right.scatter(r["calls_per_s"], r["p99_ms"], s=30 + r["errors"] / 200,
                      label=f"{r['director']} ({r['envoys']:,} x {r['period_s']:g} s{errors})")
    right.set(title="health checks: p99 at the rate served (marker grows with errors)",
              xlabel="calls/s served", ylabel="p99 ms", yscale="log")
    right.legend(fontsize=7)
    return figure


def transfer(run: dict[str, Any]) -> Figure:
    """GB/s by model size: raw gRPC, fedkube (bulk port) and its gRPC streams."""
    rows: Rows = run["results"]
    modes = sorted({r["mode"] for r in rows})
    figure, axes = plt.subplots(len(modes), 2, figsize=(11, 3.6 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, direction in enumerate(("upload", "download")):
            axis: Axes = axes[i][j]
            mine = sorted((r for r in rows if r["mode"] == mode and r["direction"] == direction),
                          key=lambda r: r["mib"])
            sizes = [r["mib"] for r in mine]
            for key, label, style in (("raw_gb_s", "raw gRPC", "k--"),
                                      ("fedkube_gb_s", "fedkube (bulk port)", "o-"),
                                      ("stream_gb_s", "fedkube gRPC streams", "s:")):
                axis.plot(sizes, [r[key] for r in mine], style, label=label)
            axis.set(title=f"{mode} {direction}", xlabel="MiB", ylabel="GB/s", xscale="log",
                     ylim=(0, None))
            axis.set_xticks(sizes, [str(s) for s in sizes])
            axis.legend(fontsize=7)
    return figure


def aggregation(run: dict[str, Any]) -> Figure:
    """GB/s and peak memory by number of updates K: streaming FedAvg against stacking."""
    rows: Rows = run["results"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple[str, int], Rows] = defaultdict(list)
    for r in rows:
        series[(r["method"], r["mib"])].append(r)
    for (method, mib), mine in sorted(series.items()):
        done = sorted((r for r in mine if r["gb_per_s"]), key=lambda r: r["updates"])
        style = "o-" if method == "streaming" else "s--"
        left.plot([r["updates"] for r in done], [r["gb_per_s"] for r in done], style,
                  label=f"{method}, {mib} MiB")
        right.plot([r["updates"] for r in done], [r["peak_rss_mib"] for r in done], style,
                   label=f"{method}, {mib} MiB")
    left.set(title="FedAvg throughput", xlabel="updates K", ylabel="GB/s", xscale="log",
             yscale="log")
    right.set(title="peak memory", xlabel="updates K", ylabel="MiB", xscale="log",
              yscale="log")
    for axis in (left, right):
        axis.legend(fontsize=7)
    return figure


def _by_model_size(run: dict[str, Any], lines: list[tuple[str, str, str]], title: str,
                   ylabel: str) -> Figure:
    """One line per (figure key, style, label) against the model's size."""
    rows: Rows = sorted(run["results"], key=lambda r: r["mib"])
    figure, axis = plt.subplots(figsize=(6, 4))
    sizes = [r["mib"] for r in rows]
    for key, style, label in lines:
        axis.plot(sizes, [r[key] for r in rows], style, label=label)
    axis.set(title=title, xlabel="model MiB", ylabel=ylabel, xscale="log", yscale="log")
    axis.set_xticks(sizes, [str(s) for s in sizes])
    axis.legend()
    return figure


def round_close(run: dict[str, Any]) -> Figure:
    """The event loop's longest stall at a round's close, on the loop and in a thread."""
    return _by_model_size(run, [("on_loop_stall_s", "s--", "close on the loop"),
                                ("fedkube_stall_s", "o-", "fedkube (thread)")],
                          "event-loop stall while a round closes", "longest stall, s")


def model_save(run: dict[str, Any]) -> Figure:
    return _by_model_size(run, [("message_s", "s--", "protobuf message"),
                                ("segments_s", "o-", "fedkube segments")],
                          "saving a model", "s")


PLOTS: dict[str, Callable[[dict[str, Any]], Figure]] = {
    "health_checks": health_checks, "transfer": transfer, "aggregation": aggregation,
    "round_close": round_close, "model_save": model_save}


def draw(path: Path, out: Path) -> Path | None:
    run = json.loads(path.read_text())
    plot = PLOTS.get(run.get("benchmark", ""))
    if plot is None:
        return None
    figure = plot(run)
    figure.suptitle(f"{run['benchmark']} ({_machine(run)})")
    figure.tight_layout()
    target = out / f"{path.stem}.png"
    figure.savefig(target, dpi=90)
    plt.close(figure)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.runs:
        target = draw(path, args.out)
        print(f"{path} -> {target}" if target else f"{path}: no plot for this benchmark")


if __name__ == "__main__":
    main()
