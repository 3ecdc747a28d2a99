"""OpenFL 1.6's adaptive aggregation (AdagradAdaptiveAggregation, AdamAdaptiveAggregation,
YogiAdaptiveAggregation), by fedkube's implementation: the round's weighted average is a
pseudo-gradient step from the global model, taken by a server-side optimizer.

OpenFL's AdaptiveAggregation: gradient = sum_i w_i (base - x_i) over the done
collaborators (weights normalised by data size) = base - weighted average; the optimizer
(openfl.utilities.optimizers.numpy) steps its parameters, which start as the initial model
and are the global model after every round. The optimizer's moments live across rounds;
fedkube saves them with each round's model, so a restarted director goes on with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedkube.aggregator.fedavg import Model

# OpenFL's defaults, per optimizer.
DEFAULTS: Mapping[str, Mapping[str, float]] = {
    "adagrad": {"learning_rate": 0.01, "initial_accumulator_value": 0.1, "epsilon": 1e-10},
    "adam": {"learning_rate": 0.01, "beta_1": 0.9, "beta_2": 0.999,
             "initial_accumulator_value": 0.0, "epsilon": 1e-8},
    "yogi": {"learning_rate": 0.01, "beta_1": 0.9, "beta_2": 0.999,
             "initial_accumulator_value": 0.0, "epsilon": 1e-8},
}


class AdaptiveOptimizer:
    def __init__(self, kind: str, settings: Mapping[str, float], model: Model) -> None:
        self.kind = kind
        self.settings = {**DEFAULTS[kind], **settings}
        start = self.settings["initial_accumulator_value"]
        self.step_count = 0
        self.first = {n: np.full(v.shape, start, np.float64) for n, v in model.items()}
        self.second = {n: np.full(v.shape, start, np.float64) for n, v in model.items()}

    def step(self, base: Model, average: Model) -> Model:
        """The next global model, from the current one and the round's weighted average."""
        s = self.settings
        lr, eps = s["learning_rate"], s["epsilon"]
        self.step_count += 1
        t = self.step_count
        updated: Model = {}
        for name, current in base.items():
            grad = current.astype(np.float64) - average[name]
            if self.kind == "adagrad":
                self.second[name] = self.second[name] + grad ** 2
                change = lr * grad / (np.sqrt(self.second[name]) + eps)
            else:
                b1, b2 = s["beta_1"], s["beta_2"]
                self.first[name] = b1 * self.first[name] + (1.0 - b1) * grad
                if self.kind == "yogi":
                    sign = np.sign(grad ** 2 - self.second[name])
                    self.second[name] = b2 * self.second[name] + (1.0 - b2) * sign * grad ** 2
                else:
                    self.second[name] = b2 * self.second[name] + (1.0 - b2) * grad ** 2
                mean = self.first[name] / (1.0 - b1 ** t)
                var = self.second[name] / (1.0 - b2 ** t)
                change = lr * mean / (np.sqrt(var) + eps)
            updated[name] = (current - change).astype(np.float32)
        return updated

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        arrays: dict[str, np.ndarray] = {"step": np.array(self.step_count)}
        arrays.update({f"first/{n}": v for n, v in self.first.items()})
        arrays.update({f"second/{n}": v for n, v in self.second.items()})
        with tmp.open("wb") as file:
            np.savez(file, allow_pickle=False, **arrays)
        tmp.replace(path)

    def load(self, path: Path) -> None:
        with np.load(path) as saved:
            self.step_count = int(saved["step"])
            for name in self.first:
                self.first[name] = saved[f"first/{name}"]
                self.second[name] = saved[f"second/{name}"]
