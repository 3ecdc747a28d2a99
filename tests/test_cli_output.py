"""What `fedkube experiment list|status|metrics`, `fedkube shards` and the demo print:
headers, aligned columns, whole lines when piped, one metric format, rounds 0..N."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from fedkube.cli import experiment as cli
from fedkube.client import ExperimentView, Metric
from fedkube.client.director_client import Review
from fedkube.client.ui import (
    EXPERIMENT_COLUMNS,
    METRIC_COLUMNS,
    Column,
    best_round,
    console_for,
    display_round,
    experiment_rows,
    metric_line,
    metric_rows,
    plain_table,
    print_table,
    progress_detail,
    shown_metrics,
    status_lines,
    trained_rounds,
)


def events(rounds: int = 3) -> list[Metric]:
    """What fedkube's aggregator reports for `rounds` rounds on env0 and env1, in its
    order: per round (0-based) validations of the model handed out, training, the
    aggregated validation and the count of results; then the final validation."""
    metrics = []
    for r in range(rounds + 1):
        accuracy = 0.1 + 0.2 * r if r != 2 else 0.9
        for shard in ("env0", "env1"):
            metrics.append(Metric(shard, "validate", "accuracy", accuracy, r))
            if r < rounds:
                metrics.append(Metric(shard, "train", "loss", 1.0 / (r + 1), r))
        metrics.append(Metric("aggregator", "aggregated_validate", "accuracy", accuracy, r))
        if r < rounds:
            metrics.append(Metric("aggregator", "train", "collaborators", 2.0, r))
    return metrics


def view(**changes: Any) -> ExperimentView:
    fields: dict[str, Any] = {
        "name": "digits-1", "status": "finished", "round": 3, "total_rounds": 3,
        "metric": "accuracy", "last_metrics": {"accuracy": 0.845794},
        "best_metrics": {"accuracy": 0.897213}, "error": "", "queue_position": 0,
        "collaborators": ["env0", "env1"]}
    return ExperimentView(**{**fields, **changes})


# -- tables ---------------------------------------------------------------------------------

def test_plain_table_has_a_header_and_aligned_columns() -> None:
    columns = (Column("NAME"), Column("STATUS"), Column("PROGRESS", "right"))
    text = plain_table(columns, [["a", "finished", "100%"], ["a-longer-name", "pending", "0%"]])
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "PROGRESS"]
    assert len(lines) == 3 and all(line == line.rstrip() for line in lines)
    # Left-aligned columns start together; right-aligned ones end together.
    assert {line.index(word) for line, word in zip(lines, ["STATUS", "finished", "pending"],
                                                    strict=True)} == {15}
    assert len({len(line) for line in lines}) == 1


def test_wide_columns_only_in_wide_output() -> None:
    rows = experiment_rows([("digits-1", "finished", 1.0)], {"digits-1": view()})
    narrow = plain_table(EXPERIMENT_COLUMNS, rows).splitlines()
    wide = plain_table(EXPERIMENT_COLUMNS, rows, wide=True).splitlines()
    assert narrow[0].split() == ["NAME", "STATUS", "PROGRESS"]
    assert narrow[1].split() == ["digits-1", "finished", "100%"]
    assert wide[0].split() == ["NAME", "STATUS", "PROGRESS", "ROUNDS", "METRIC"]
    assert wide[1].endswith("3/3  accuracy 0.8458 (best 0.8972)")


def test_piped_output_is_plain_and_never_cut_at_80_columns() -> None:
    sink = io.StringIO()
    console = console_for(file=sink)
    assert not console.is_terminal and console.width > 200
    long = "a-description-" * 12
    print_table((Column("NAME"), Column("DESCRIPTION")), [["env0", long]], console=console)
    lines = sink.getvalue().splitlines()
    assert lines == ["NAME  DESCRIPTION", f"env0  {long}"]  # no box, no colour, whole


def test_a_terminal_gets_a_rich_table_that_fits_its_width() -> None:
    sink = io.StringIO()
    console = Console(file=sink, force_terminal=True, width=60, color_system=None)
    long = "a-description-" * 12
    print_table((Column("NAME"), Column("DESCRIPTION")), [["env0", long]], console=console,
                title="Shards")
    lines = sink.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 60
    assert any("NAME" in line and "DESCRIPTION" in line for line in lines)


# -- metrics and rounds ---------------------------------------------------------------------

def test_metric_line_format() -> None:
    line = metric_line("accuracy", 0.845794, 0.897213, 4)
    assert line == "accuracy 0.8458 (best 0.8972, round 4)"
    assert metric_line("accuracy", 0.845794, 0.897213) == "accuracy 0.8458 (best 0.8972)"
    assert metric_line("accuracy", 0.845794) == "accuracy 0.8458"
    assert metric_line("loss", 1.5e-5) == "loss 1.5e-05"  # not 0.0000


def test_status_is_lines_not_python_dicts() -> None:
    lines = status_lines(view(), round_of_best=2)
    text = "\n".join(lines)
    assert "{" not in text and "}" not in text
    assert lines[0] == "digits-1: finished, 3 of 3 rounds done"
    assert lines[1].endswith(": accuracy 0.8458 (best 0.8972, round 2)")
    running = status_lines(view(status="in_progress", round=1, last_metrics={},
                                best_metrics={}, metric=""))
    assert running == ["digits-1: in_progress, 1 of 3 rounds done, round 2 running"]
    waiting = status_lines(view(status="pending", round=0, review={
        "env0": Review("awaiting", ""), "env1": Review("refused", "no consent")}))
    assert "awaiting approval from env0" in waiting
    assert "refused by env1: no consent" in waiting
    assert "validation accuracy 0.8458 (best 0.8972)" in progress_detail(view())


def test_rounds_are_numbered_0_for_the_initial_model_then_1_to_n() -> None:
    metrics = events(rounds=3)
    validated = sorted(display_round(m) for m in metrics if m.task == "aggregated_validate")
    trained = sorted({display_round(m) for m in metrics if m.task == "train"})
    assert validated == [0, 1, 2, 3]  # round 0: the initial model's evaluation
    assert trained == [1, 2, 3]  # 3 rounds are 3 rounds of training, not 4
    assert trained_rounds(metrics) == 3
    # Within a round, its training comes before the validation of the model it made.
    rows = metric_rows(metrics)
    assert [r[0] for r in rows] == sorted((r[0] for r in rows), key=int)
    first = [r for r in rows if r[0] == "1"]
    assert [r[2] for r in first][:2] == ["train", "train"]


def test_the_results_count_is_not_a_metric() -> None:
    metrics = events()
    assert not any(m.name == "collaborators" for m in shown_metrics(metrics))
    text = plain_table(METRIC_COLUMNS, metric_rows(metrics))
    assert "collaborators" not in text
    lines = text.splitlines()
    assert lines[0].split() == ["ROUND", "ORIGIN", "TASK", "METRIC", "VALUE"]
    assert lines[1].split() == ["0", "env0", "validate", "accuracy", "0.1000"]
    # wide: the count is the RESULTS column of the round its results made
    wide = plain_table(METRIC_COLUMNS, metric_rows(metrics), wide=True).splitlines()
    assert wide[0].split()[-1] == "RESULTS"
    assert wide[1].split()[-1] == "-" and all(line.split()[-1] == "2" for line in wide[-5:])


def test_best_round_is_found_from_the_directors_rounded_figure() -> None:
    metrics = events()
    assert best_round(metrics, "accuracy", float(f"{0.9:.6g}")) == 2
    assert best_round(metrics, "accuracy", 0.123) is None


# -- the commands ---------------------------------------------------------------------------

class FakeClient:
    def experiments(self) -> list[tuple[str, str, float]]:
        return [("digits-1", "finished", 1.0), ("a-much-longer-name", "in_progress", 0.4)]

    def status(self, name: str) -> ExperimentView:
        return view(name=name, best_metrics={"accuracy": 0.9})

    def metrics(self, name: str, *, follow: bool = True,
                snapshot_s: float = 2.0) -> list[Metric]:
        return events()


@pytest.mark.parametrize("action", ["list", "status", "metrics"])
def test_commands_print_tables_or_json(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = cli.ACTIONS[action]
    for output in ("table", "wide"):
        assert run(FakeClient(), argparse.Namespace(name="digits-1", output=output)) == 0  # type: ignore[arg-type]
        text = capsys.readouterr().out
        assert "{" not in text and "collaborators 2" not in text
        if action == "list":
            assert text.splitlines()[0].split()[:3] == ["NAME", "STATUS", "PROGRESS"]
        if action == "status":
            assert "accuracy 0.8458 (best 0.9000, round 2)" in text
    assert run(FakeClient(), argparse.Namespace(name="digits-1", output="json")) == 0  # type: ignore[arg-type]
    shown = json.loads(capsys.readouterr().out)
    if action == "status":  # the fields other code reads stay as they were
        assert shown["last_metrics"] == {"accuracy": 0.845794} and shown["round"] == 3
        assert {"name", "status", "total_rounds", "metric", "best_metrics", "error",
                "queue_position", "collaborators", "dropped", "review"} <= set(shown)
    elif action == "list":
        assert shown[0] == {"name": "digits-1", "status": "finished", "progress": 1.0}
    else:  # every event, the count included: scripts get what the director sent
        assert len(shown) == len(events())


# -- the plot -------------------------------------------------------------------------------

def test_plot_has_integer_round_ticks_a_title_and_the_baseline(tmp_path: Path) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from fedkube.client.plot import metrics_figure, plot_metrics

    figure = metrics_figure(events(), experiment="digits-demo", baseline=0.95)
    try:
        left, right = figure.axes
        for axis in (left, right):
            locator = axis.xaxis.get_major_locator()
            assert isinstance(locator, MaxNLocator) and locator._integer  # type: ignore[attr-defined]
            assert all(float(t).is_integer() for t in axis.get_xticks())
        suptitle = figure._suptitle  # type: ignore[attr-defined]
        assert suptitle is not None and "digits-demo" in suptitle.get_text()
        baselines = [line for line in left.get_lines()
                     if str(line.get_label()).startswith("centralized baseline")]
        assert len(baselines) == 1
        assert set(np.asarray(baselines[0].get_ydata()).tolist()) == {0.95}
        aggregated = next(line for line in left.get_lines()
                          if isinstance(line, Line2D) and "aggregated" in str(line.get_label()))
        assert np.asarray(aggregated.get_xdata()).tolist() == [0, 1, 2, 3]
        assert not any("collaborators" in str(line.get_label()) for line in right.get_lines())
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)
    without = metrics_figure(events(), experiment="x")
    try:
        assert not [line for line in without.axes[0].get_lines()
                    if str(line.get_label()).startswith("centralized")]
    finally:
        import matplotlib.pyplot as plt

        plt.close(without)
    plot_metrics(events(), tmp_path / "m.png", experiment="x", baseline=0.9)
    assert (tmp_path / "m.png").read_bytes().startswith(b"\x89PNG")


def test_the_shell_completes_commands_and_flags(tmp_path: Path) -> None:
    """`fedkube completion bash` prints the shell code; the completion it runs answers
    from the parser itself (argcomplete), subcommands and flags alike."""
    import os
    import subprocess
    import sys

    code = subprocess.run([sys.executable, "-m", "fedkube.cli", "completion", "bash"],
                          capture_output=True, text=True, timeout=60)
    assert code.returncode == 0 and "complete" in code.stdout and "fedkube" in code.stdout

    def complete(line: str) -> list[str]:
        out = tmp_path / "completions"
        env = {**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": line,
               "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
               "_ARGCOMPLETE_IFS": "\n"}
        subprocess.run([sys.executable, "-m", "fedkube.cli"], env=env, timeout=60,
                       capture_output=True)
        return [word.strip() for word in out.read_text().split("\n")]

    assert complete("fedkube exper") == ["experiment"]
    assert "--rounds" in complete("fedkube experiment submit --ro")
