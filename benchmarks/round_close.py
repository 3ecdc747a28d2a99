"""A round's close (the average, best.pb and last.pb, the next round's zeroed sum) and
the director's event loop: fedkube's close, which does that work in a thread, against
the same work on the loop, as the director did it before. The figure that matters is
the loop's longest stall while a round closes: nothing else the director serves (health
checks, other experiments' results) is answered during a stall. Best of two, in seconds.

    python -m benchmarks.round_close --mib 64,256,1024 [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from benchmarks.report import report
from fedkube.aggregator.experiment import ExperimentAggregator
from fedkube.aggregator.fedavg import StreamingFedAvg
from fedkube.api.plan import Plan

MiB = 1 << 20
TICK_S = 0.001


class Quiet:
    def round_closed(self, name: str, *, round_number: int, total_rounds: int,
                     summary: dict[str, str]) -> None:
        pass

    def experiment_done(self, name: str, *, error: str | None) -> None:
        pass


def ready_to_close(workdir: Path, mib: int) -> ExperimentAggregator:
    """An aggregator whose round 0 has both results in and a score to save as best."""
    size = mib * MiB // 4
    aggregator = ExperimentAggregator(
        name="bench", plan=Plan(task="digits-logreg", rounds=3), collaborators=["a", "b"],
        initial={"w": np.zeros(size, np.float32)}, workdir=workdir, outcome=Quiet(),
        clock=time.monotonic)
    update = {"w": np.full(size, 0.5, np.float32)}
    for sender in ("a", "b"):
        aggregator._fedavg.add(update, 1.0)
        aggregator._trained.add(sender)
        aggregator._validated[sender] = (0.9, 1.0)
    return aggregator


async def longest_stall(work: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """(the loop's longest gap between 1 ms ticks while work runs, work's wall time)."""
    gaps: list[float] = []
    running = True

    async def ticker() -> None:
        last = time.perf_counter()
        while running:
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticks = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await work()
    wall = time.perf_counter() - started
    running = False
    await ticks
    return max(gaps), wall


async def fedkube_close(aggregator: ExperimentAggregator) -> None:
    async with aggregator._receiving:
        await aggregator._close_round()
    assert aggregator.round == 1


async def close_on_the_loop(aggregator: ExperimentAggregator) -> None:
    """The same steps, as the director ran them on its loop before."""
    aggregator._score_round()
    aggregator._save("best.pb", aggregator.model, 0)
    model = aggregator._fedavg.result()
    aggregator._save("last.pb", model, 1)
    aggregator.model, aggregator.round = model, 1
    aggregator._start_round(StreamingFedAvg(model))


def measure(mib: int, close: Callable[[ExperimentAggregator], Awaitable[None]]
            ) -> tuple[float, float]:
    best = (float("inf"), float("inf"))
    for _ in range(2):
        with tempfile.TemporaryDirectory(prefix="fedkube-close-") as tmp:
            aggregator = ready_to_close(Path(tmp), mib)

            async def run(agg: ExperimentAggregator = aggregator) -> tuple[float, float]:
                return await longest_stall(lambda: close(agg))

            stall, wall = asyncio.run(run())
            best = min(best, (stall, wall))
            del aggregator
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", default="64,256,1024")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for mib in (int(m) for m in args.mib.split(",")):
        before_stall, before_wall = measure(mib, close_on_the_loop)
        stall, wall = measure(mib, fedkube_close)
        rows.append({"mib": mib, "on_loop_stall_s": before_stall, "on_loop_wall_s": before_wall,
                     "fedkube_stall_s": stall, "fedkube_wall_s": wall})
    report("round_close", "A round's close: the event loop's longest stall (s, best of two)",
           ("MiB", "on the loop: stall", "fedkube: stall", "fedkube: close took", "stall cut"),
           [(str(row["mib"]), f"{row['on_loop_stall_s']:.3f}", f"{row['fedkube_stall_s']:.4f}",
             f"{row['fedkube_wall_s']:.3f}",
             f"{row['on_loop_stall_s'] / row['fedkube_stall_s']:.0f}x") for row in rows],
           rows, as_json=args.json)


if __name__ == "__main__":
    main()
