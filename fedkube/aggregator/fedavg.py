"""Streaming FedAvg: a running weighted sum updated as each result arrives.

Memory is one float64 accumulator per tensor (one model) plus the result being added,
whatever the number of collaborators; np.stack-then-average needs K models at once.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Model = dict[str, npt.NDArray[np.float32]]


class StreamingFedAvg:
    def __init__(self, template: Model) -> None:
        self._sums = {name: np.zeros(value.shape, np.float64) for name, value in template.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Model, weight: float) -> None:
        if weight <= 0:
            raise ValueError("weights must be positive")
        for name, total in self._sums.items():
            # In place: no temporary the size of the model beyond the float64 product.
            total += np.multiply(update[name], weight, dtype=np.float64)
        self.total_weight += weight
        self.count += 1

    def result(self) -> Model:
        if self.count == 0:
            raise ValueError("no updates to average")
        return {name: (total / self.total_weight).astype(np.float32)
                for name, total in self._sums.items()}
