"""What the CLI and the demo print: tables, metric lines and round numbers.

Tables have a header row and aligned columns. On a terminal they are rich tables that fit
its width; piped (or redirected) they are plain text, columns two spaces apart, never cut
at 80 columns, so `grep`, `cut` and `column` work on them (`--output json` is for scripts).

Rounds are numbered as people count them: round r (1..N) trains the global model into the
model that round r's validation scores; round 0 is the initial model's evaluation. The
aggregator counts from 0 when it hands models out (its round r validates m_r and trains it
into m_{r+1}), so a training metric of its round r is shown as round r+1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedkube.client import DirectorClient, EnvoyView, ExperimentView, Metric

# A piped console's width: wide enough that rich never wraps what it prints there.
PIPED_WIDTH = 1000
AGGREGATOR = "aggregator"
# The aggregator's count of the training results a round averaged: a count, not a metric.
RESULTS_COUNT = (AGGREGATOR, "train", "collaborators")
# Tasks whose metrics are about a round's training (measured after it), in fedkube's and
# OpenFL's rounds; every other task validates the model the round handed out.
AFTER_TRAINING = frozenset({"train", "locally_tuned_model_validate"})


# -- tables -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    header: str
    justify: Literal["left", "right"] = "left"
    wide: bool = False  # only in `--output wide`
    # Rich styles by cell value, on a terminal only (e.g. {"yes": "green"}).
    styles: tuple[tuple[str, str], ...] = ()


def console_for(*, stderr: bool = False, file: IO[str] | None = None) -> Console:
    """A console: on a terminal, its width; piped, wide enough that nothing is cut."""
    console = Console(stderr=stderr, file=file)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, file=file, width=PIPED_WIDTH, highlight=False)


def shown_columns(columns: Sequence[Column], *, wide: bool) -> list[int]:
    return [i for i, column in enumerate(columns) if wide or not column.wide]


def plain_table(columns: Sequence[Column], rows: Iterable[Sequence[str]], *,
                wide: bool = False) -> str:
    """The table as text: a header row, then each row, columns aligned two spaces apart,
    however wide (no trailing spaces)."""
    keep = shown_columns(columns, wide=wide)
    cells = [[columns[i].header for i in keep]]
    cells += [[str(row[i]) for i in keep] for row in rows]
    widths = [max(len(line[j]) for line in cells) for j in range(len(keep))]
    lines = []
    for line in cells:
        padded = [cell.rjust(width) if columns[i].justify == "right" else cell.ljust(width)
                  for i, cell, width in zip(keep, line, widths, strict=True)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def rich_table(columns: Sequence[Column], rows: Iterable[Sequence[str]], *,
               wide: bool = False, title: str | None = None) -> Table:
    keep = shown_columns(columns, wide=wide)
    table = Table(title=title)
    for i in keep:
        table.add_column(columns[i].header, justify=columns[i].justify)
    for row in rows:
        table.add_row(*(Text(str(row[i]), style=dict(columns[i].styles).get(str(row[i]), ""))
                        for i in keep))
    return table


def print_table(columns: Sequence[Column], rows: Iterable[Sequence[str]], *,
                wide: bool = False, title: str | None = None,
                console: Console | None = None) -> None:
    """A rich table on a terminal; plain aligned text (no title) when piped."""
    console = console or console_for()
    rows = list(rows)
    if console.is_terminal:
        console.print(rich_table(columns, rows, wide=wide, title=title))
    else:
        console.file.write(plain_table(columns, rows, wide=wide) + "\n")
        console.file.flush()


# -- figures and rounds -------------------------------------------------------------------

def figure(value: float) -> str:
    """A metric's value: 4 decimals, or 4 significant digits when that would hide it."""
    if not math.isfinite(value):
        return str(value)
    if value != 0 and not 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.4f}"


def display_round(metric: Metric) -> int:
    """The round as shown: 1..N for training, 0 for the initial model's evaluation."""
    return metric.round + 1 if metric.task in AFTER_TRAINING else metric.round


def is_results_count(metric: Metric) -> bool:
    return (metric.origin, metric.task, metric.name) == RESULTS_COUNT


def shown_metrics(metrics: Iterable[Metric]) -> list[Metric]:
    """The metrics, without the aggregator's count of results, ordered by shown round
    (within a round: as reported, training first)."""
    return sorted((m for m in metrics if not is_results_count(m)), key=display_round)


def results_by_round(metrics: Iterable[Metric]) -> dict[int, int]:
    """How many collaborators' training results each round's model averages."""
    return {display_round(m): int(m.value) for m in metrics if is_results_count(m)}


def trained_rounds(metrics: Iterable[Metric]) -> int:
    """The training rounds the metrics cover (an initial evaluation is not one)."""
    return max((display_round(m) for m in metrics), default=0)


def best_round(metrics: Iterable[Metric], name: str, best: float) -> int | None:
    """The first round whose aggregated validation `name` was `best` (as the director
    reports it, to 6 significant digits); None if the metrics have no such round."""
    for m in metrics:
        if (m.origin == AGGREGATOR and m.name == name and m.task not in AFTER_TRAINING
                and math.isclose(m.value, best, rel_tol=1e-5, abs_tol=1e-9)):
            return display_round(m)
    return None


def metric_line(name: str, last: float | None, best: float | None = None,
                round_of_best: int | None = None) -> str:
    """`accuracy 0.8458 (best 0.8972, round 4)`."""
    line = f"{name} {'-' if last is None else figure(last)}"
    if best is not None:
        line += f" (best {figure(best)}" + (
            f", round {round_of_best})" if round_of_best is not None else ")")
    return line


def status_metric_line(view: ExperimentView, round_of_best: int | None = None) -> str:
    """The experiment's metric as a line; empty if it has none yet."""
    if not view.metric:
        return ""
    return metric_line(view.metric, view.last_metrics.get(view.metric),
                       view.best_metrics.get(view.metric), round_of_best)


def rounds_done(view: ExperimentView) -> str:
    """`3 of 5 rounds done, round 4 running`: the director's round is the count of rounds
    closed; once every round is, the final model is being scored."""
    text = f"{view.round} of {view.total_rounds} rounds done"
    if view.status == "in_progress":
        text += (f", round {view.round + 1} running" if view.round < view.total_rounds
                 else ", scoring the final model")
    return text


def status_lines(view: ExperimentView, *, round_of_best: int | None = None,
                 wide: bool = False) -> list[str]:
    """`fedkube experiment status` for people."""
    lines = [f"{view.name}: {view.status}, {rounds_done(view)}"]
    metric = status_metric_line(view, round_of_best)
    if metric:
        lines.append(f"global model validated on the shards' data: {metric}")
    if view.queue_position:
        lines.append(f"queued at position {view.queue_position}")
    if view.awaiting_approval:
        lines.append(f"awaiting approval from {', '.join(view.awaiting_approval)}")
    lines += [f"refused by {shard}: {r.reason}" for shard, r in view.review.items()
              if r.decision == "refused"]
    if view.dropped:
        lines.append(f"dropped (missed a round's deadline): {', '.join(view.dropped)}")
    if wide:
        lines.append(f"collaborators: {', '.join(view.collaborators) or '-'}")
        lines += [f"review by {shard}: {r.decision}" + (f" ({r.reason})" if r.reason else "")
                  for shard, r in view.review.items()]
    if view.error:
        lines.append(f"error: {view.error}")
    return lines


# -- the commands' tables -----------------------------------------------------------------

EXPERIMENT_COLUMNS = (Column("NAME"), Column("STATUS"), Column("PROGRESS", "right"),
                      Column("ROUNDS", "right", wide=True), Column("METRIC", wide=True))


def experiment_rows(rows: Iterable[tuple[str, str, float]],
                    views: dict[str, ExperimentView] | None = None) -> list[list[str]]:
    """`fedkube experiment list`; `views` (wide) add each one's rounds and metric."""
    views = views or {}
    table = []
    for name, state, progress in rows:
        view = views.get(name)
        table.append([name, state, f"{progress:.0%}",
                      f"{view.round}/{view.total_rounds}" if view else "-",
                      (status_metric_line(view) or "-") if view else "-"])
    return table


METRIC_COLUMNS = (Column("ROUND", "right"), Column("ORIGIN"), Column("TASK"),
                  Column("METRIC"), Column("VALUE", "right"),
                  Column("RESULTS", "right", wide=True))


def metric_rows(metrics: Sequence[Metric]) -> list[list[str]]:
    """`fedkube experiment metrics`: one row a metric, by round; the aggregator's count of
    training results is no metric: it is the RESULTS column (wide) of its round."""
    results = results_by_round(metrics)
    return [[str(display_round(m)), m.origin, m.task, m.name, figure(m.value),
             str(results.get(display_round(m), "-"))] for m in shown_metrics(metrics)]


def _ago(stamp: float) -> str:
    if stamp <= 0:
        return "never"
    seconds = max(0.0, time.time() - stamp)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


SHARD_COLUMNS = (Column("NAME"), Column("ONLINE", styles=(("yes", "green"), ("no", "red"))),
                 Column("SAMPLES", "right"), Column("SHAPES"), Column("CUDA DEVICES"),
                 Column("EXPERIMENT"), Column("LAST HEALTH CHECK"),
                 Column("DESCRIPTION", wide=True))


def shard_rows(envoys: Sequence[EnvoyView]) -> list[list[str]]:
    rows = []
    for envoy in envoys:
        gpus = ", ".join(f"{d['index']}:{d['name']}" for d in envoy.cuda_devices) or "-"
        rows.append([envoy.name, "yes" if envoy.online else "no", str(envoy.n_samples),
                     f"{'x'.join(envoy.sample_shape)} -> {'x'.join(envoy.target_shape)}",
                     gpus, envoy.experiment or "-", _ago(envoy.last_health_check),
                     envoy.description or "-"])
    return rows


def shards_table(envoys: Sequence[EnvoyView], *, wide: bool = True) -> Table:
    return rich_table(SHARD_COLUMNS, shard_rows(envoys), wide=wide,
                      title="Shards registered with the director")


# -- following an experiment --------------------------------------------------------------

def progress_detail(status: ExperimentView) -> str:
    detail = status.status
    if status.queue_position:
        detail += f" (queued, position {status.queue_position})"
    if status.awaiting_approval:
        detail += f" (awaiting approval from {', '.join(status.awaiting_approval)})"
    metric = status_metric_line(status)
    if metric:
        detail += f"  validation {metric}"
    return detail


def wait_with_progress(client: DirectorClient, name: str, *, timeout: float,
                       console: Console | None = None) -> ExperimentView:
    """Waits for an experiment with a rich progress bar of rounds done, on its own line
    (on a terminal only: piped, its frames would be noise on stderr)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = console or console_for(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      MofNCompleteColumn(), TextColumn("rounds  {task.fields[detail]}"),
                      console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task(name, total=None, detail="")

        def update(status: ExperimentView) -> None:
            bar.update(task, total=status.total_rounds or None, completed=status.round,
                       detail=progress_detail(status))

        return client.wait(name, timeout=timeout, on_update=update)
