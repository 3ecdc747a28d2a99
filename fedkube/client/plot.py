"""An experiment's metrics as a PNG (`fedkube experiment plot`, and the demo's plot)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedkube.client import Metric
from fedkube.client.ui import AFTER_TRAINING, AGGREGATOR, display_round, shown_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def metrics_figure(metrics: list[Metric], *, experiment: str, metric: str = "accuracy",
                   baseline: float | None = None,
                   baseline_label: str = "centralized baseline") -> Figure:
    """Validation `metric` and training loss by round (round 0: the initial model's
    evaluation; rounds 1..N trained): one line per collaborator, and the aggregated
    figure of the global model in bold; `baseline` as a dashed horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    shown = shown_metrics(metrics)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for origin in sorted({m.origin for m in shown}):
        validated = [(display_round(m), m.value) for m in shown if m.origin == origin
                     and m.name == metric and m.task not in AFTER_TRAINING]
        loss = [(display_round(m), m.value) for m in shown
                if m.origin == origin and m.task == "train" and m.name == "loss"]
        style = {"linewidth": 3, "color": "black"} if origin == AGGREGATOR else {"alpha": 0.6}
        label = "aggregated (global model)" if origin == AGGREGATOR else origin
        if validated:
            left.plot(*zip(*validated, strict=True), marker="o", label=label, **style)
        if loss:
            right.plot(*zip(*loss, strict=True), marker=".", label=label, **style)
    if baseline is not None:
        left.axhline(baseline, linestyle="--", color="tab:red",
                     label=f"{baseline_label} ({baseline:.4f})")
    left.set(title=f"validation {metric} (round 0: the initial model)", xlabel="round",
             ylabel=metric)
    right.set(title="training loss", xlabel="round", ylabel="loss")
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.suptitle(f"experiment {experiment}")
    figure.tight_layout()
    return figure


def plot_metrics(metrics: list[Metric], path: Path, *, experiment: str,
                 metric: str = "accuracy", baseline: float | None = None,
                 baseline_label: str = "centralized baseline") -> None:
    """metrics_figure(...) written to `path` as a PNG."""
    figure = metrics_figure(metrics, experiment=experiment, metric=metric, baseline=baseline,
                            baseline_label=baseline_label)
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=100)
    plt.close(figure)
