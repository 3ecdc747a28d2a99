"""An experiment's metrics as a PNG (`fedkube experiment plot`, and the demo's plot)."""

from __future__ import annotations

from pathlib import Path

from fedkube.client import Metric


def plot_metrics(metrics: list[Metric], path: Path) -> None:
    """Validation accuracy and training loss by round: one line per collaborator, and the
    aggregated figure of the global model in bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for origin in sorted({m.origin for m in metrics}):
        acc = [(m.round, m.value) for m in metrics if m.origin == origin and m.name == "accuracy"]
        loss = [(m.round, m.value) for m in metrics
                if m.origin == origin and m.task == "train" and m.name == "loss"]
        style = {"linewidth": 3, "color": "black"} if origin == "aggregator" else {"alpha": 0.6}
        if acc:
            left.plot(*zip(*acc, strict=True), marker="o", label=origin, **style)
        if loss:
            right.plot(*zip(*loss, strict=True), marker=".", label=origin, **style)
    left.set(title="validation accuracy of the global model", xlabel="round",
             ylabel="accuracy")
    right.set(title="training loss", xlabel="round", ylabel="loss")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
