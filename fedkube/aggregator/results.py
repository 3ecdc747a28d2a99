"""The checks on what a collaborator's task result carries, before any of it touches the
model: a positive data size; tensors that decode (little-endian float32, a shape that
fits the bytes: fedkube.transport.tensors) and hold no NaN or Inf; metrics that are
scalars; no tensor twice; for training, exactly the model's tensors in its shapes; for
validation, the plan's metric.

Whether the round takes the result at all (its sender, round and task, the round's phase)
is the experiment's to say (fedkube.aggregator.experiment). No state here: the checks run
in a worker thread for large results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from fedkube.aggregator.fedavg import Model, all_finite
from fedkube.api.errors import InvalidArgumentError
from fedkube.proto import aggregator_pb2, base_pb2
from fedkube.transport.tensors import TensorError, from_named_tensor

TRAIN, VALIDATE = "train", "validate"


def checked_values(tensor: base_pb2.NamedTensor, payload: memoryview | None = None
                   ) -> npt.NDArray[np.float32]:
    """A result tensor's values (payload: its bytes when parsed apart), or
    InvalidArgumentError if they do not decode or hold NaN or Inf."""
    try:
        value = from_named_tensor(tensor, payload)
    except TensorError as exc:
        raise InvalidArgumentError(str(exc)) from exc
    if not all_finite(value):
        raise InvalidArgumentError(f"tensor {tensor.name!r} holds NaN or Inf")
    return value


def check_task_results(results: aggregator_pb2.TaskResults, *, model: Model, metric: str,
                       payloads: Sequence[memoryview] | None = None
                       ) -> tuple[Model, dict[str, float]]:
    """The result's tensors (the model update) and its metrics, or InvalidArgumentError.
    `payloads` are the tensors' bytes when the message was parsed without them."""
    if results.data_size <= 0:
        raise InvalidArgumentError("data_size must be positive")
    update: Model = {}
    figures: dict[str, float] = {}
    for i, tensor in enumerate(results.tensors):
        value = checked_values(tensor, None if payloads is None else payloads[i])
        if tensor.report:
            if value.size != 1:
                raise InvalidArgumentError(f"metric {tensor.name!r} is not a scalar")
            figures[tensor.name] = float(value.reshape(()))
        else:
            if tensor.name in update:
                raise InvalidArgumentError(f"tensor {tensor.name!r} sent twice")
            update[tensor.name] = value
    if results.task_name == TRAIN:
        if set(update) != set(model):
            raise InvalidArgumentError(f"expected tensors {sorted(model)}, got {sorted(update)}")
        for name, value in update.items():
            if value.shape != model[name].shape:
                raise InvalidArgumentError(f"tensor {name!r} has shape {value.shape}, "
                                           f"expected {model[name].shape}")
    elif metric not in figures or not math.isfinite(figures[metric]):
        raise InvalidArgumentError(f"validation results lack the metric {metric!r}")
    return update, figures
