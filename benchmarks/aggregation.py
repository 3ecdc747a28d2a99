"""Aggregation: streaming FedAvg vs np.stack + np.average (what OpenFL 1.6 does), K updates
of M MiB each. Every measurement runs in a fresh process so its peak RSS is its own.

Updates are made one at a time for the streaming aggregator (as results arrive over the
network) and all held at once for the stacking baseline (as it needs them); making them
is not timed. GB/s counts the bytes of the K updates read.

    python -m benchmarks.aggregation --updates 8,32 --mib 64,256 [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from rich.table import Table

from benchmarks.report import console, emit
from fedkube.aggregator.fedavg import StreamingFedAvg

MiB = 1 << 20


@dataclass
class Result:
    method: str
    updates: int
    mib: int
    seconds: float | None
    gb_per_s: float | None
    peak_rss_mib: float | None
    note: str = ""


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _update(base: npt.NDArray[np.float32], k: int, out: npt.NDArray[np.float32]
            ) -> npt.NDArray[np.float32]:
    return np.add(base, np.float32(k * 1e-3), out=out)


def run_one(method: str, k: int, mib: int) -> dict[str, float]:
    """Runs in the child process: aggregates and reports seconds and peak RSS."""
    n = mib * MiB // 4
    base = np.random.default_rng(0).random(n, dtype=np.float32)
    weights = [float(100 + i) for i in range(k)]
    elapsed = 0.0
    if method == "streaming":
        fedavg = StreamingFedAvg({"w": base})
        buffer = np.empty_like(base)
        for i, weight in enumerate(weights):
            update = _update(base, i, buffer)
            start = time.perf_counter()
            fedavg.add({"w": update}, weight)
            elapsed += time.perf_counter() - start
        start = time.perf_counter()
        result = fedavg.result()["w"]
        elapsed += time.perf_counter() - start
    else:
        updates = [_update(base, i, np.empty_like(base)) for i in range(k)]
        start = time.perf_counter()
        result = np.average(np.stack(updates), axis=0, weights=weights).astype(np.float32)
        elapsed = time.perf_counter() - start
    expected = base[:4] + np.float32(np.average(np.arange(k) * 1e-3, weights=weights))
    assert np.allclose(result[:4], expected, atol=1e-5), "wrong average"
    return {"seconds": elapsed, "peak_rss_mib": _peak_rss_mib()}


def _available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def measure(method: str, k: int, mib: int, repeat: int) -> Result:
    # The baseline holds K updates, their stack and a float64 product of the stack.
    need = (k * mib * 4 + mib) if method == "stacking" else 4 * mib
    if need > 0.8 * _available_mib():
        return Result(method, k, mib, None, None, None,
                      f"does not fit: needs ~{need / 1024:.0f} GiB")
    runs = [json.loads(subprocess.run(
        [sys.executable, "-m", "benchmarks.aggregation", "--one", method, str(k), str(mib)],
        capture_output=True, text=True, check=True).stdout) for _ in range(repeat)]
    figures = min(runs, key=lambda run: run["seconds"])  # best of `repeat`
    seconds = figures["seconds"]
    return Result(method, k, mib, round(seconds, 3), round(k * mib * MiB / seconds / 1e9, 2),
                  round(figures["peak_rss_mib"]))


def table(results: list[Result], as_json: bool = False) -> None:
    view = Table(title="FedAvg of K updates: streaming vs np.stack + np.average")
    for column in ("K", "MiB each", "method", "seconds", "GB/s", "peak RSS MiB", "speed-up"):
        view.add_column(column, justify="right")
    by_case = {(r.updates, r.mib, r.method): r for r in results}
    for r in results:
        speedup = ""
        baseline = by_case.get((r.updates, r.mib, "stacking"))
        if r.method == "streaming" and baseline and baseline.seconds and r.seconds:
            speedup = f"{baseline.seconds / r.seconds:.1f}x"
        view.add_row(str(r.updates), str(r.mib), r.method,
                     f"{r.seconds}" if r.seconds else r.note, f"{r.gb_per_s or ''}",
                     f"{r.peak_rss_mib or ''}", speedup)
    console(as_json).print(view)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", default="8,32", help="comma-separated K")
    parser.add_argument("--mib", default="64,256", help="comma-separated update sizes")
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "K", "MIB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    results = [measure(method, k, mib, args.repeat)
               for mib in map(int, args.mib.split(","))
               for k in map(int, args.updates.split(","))
               for method in ("streaming", "stacking")]
    table(results, args.json)
    if args.json:
        emit("aggregation", [asdict(r) for r in results])


if __name__ == "__main__":
    main()
