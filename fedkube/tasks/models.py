"""Built-in tasks: small numpy models for the digits shards.

A task is three functions over a model (a dict of float32 arrays):
    init_model(params) -> Model
    train(model, (x, y), params) -> (Model, metrics)
    validate(model, (x, y), params) -> metrics        # includes "accuracy"
User archives provide the same three functions in a module (see fedkube.tasks.archive).
The model a task receives is valid for its round: the collaborator reuses its memory for
the next round's download, so a task copies arrays it keeps across rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from fedkube.tasks.shard import Arrays

Model = dict[str, npt.NDArray[np.float32]]
Metrics = dict[str, float]
Params = Mapping[str, Any]
N_CLASSES = 10
N_FEATURES = 64


@dataclass(frozen=True)
class Task:
    name: str
    init_model: Callable[[Params], Model]
    train: Callable[[Model, Arrays, Params], tuple[Model, Metrics]]
    validate: Callable[[Model, Arrays, Params], Metrics]
    # The parameters the task takes (names, types, ranges), checked when an experiment is
    # submitted (fedkube.tasks.params); None: whatever the task makes of them.
    params: type[BaseModel] | None = None


# -- the built-in tasks' parameters -------------------------------------------------------

class _TaskParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=1, ge=1, le=10_000, description="local epochs per round")
    batch_size: int = Field(default=32, ge=1, le=1_000_000, description="samples per step")
    seed: int = Field(default=0, ge=0, description="seed of the shuffling (and the MLP's "
                                                   "initial weights)")


class LogRegParams(_TaskParams):
    learning_rate: float = Field(default=0.5, gt=0, le=1000, description="step size")
    l2: float = Field(default=1e-4, ge=0, le=1000, description="weight decay")


class MLPParams(_TaskParams):
    learning_rate: float = Field(default=0.1, gt=0, le=1000, description="step size")
    hidden: int = Field(default=64, ge=1, le=65_536, description="units of the hidden layer")


def _known(model: type[BaseModel], params: Params) -> Any:
    """params as the task's model, defaults filled in. Names it does not know are left
    out: submission refuses them, but an experiment stored before that rule still runs."""
    return model.model_validate({k: v for k, v in params.items() if k in model.model_fields})


def _softmax(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _flat(x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def _batches(n: int, size: int, rng: np.random.Generator) -> list[npt.NDArray[np.int64]]:
    order = rng.permutation(n)
    return [order[i:i + size] for i in range(0, n, size)]


# -- multinomial logistic regression ----------------------------------------------------

def logreg_init(params: Params) -> Model:
    return {"weights": np.zeros((N_FEATURES, N_CLASSES), np.float32),
            "bias": np.zeros(N_CLASSES, np.float32)}


def _logreg_logits(model: Model, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.asarray(x @ model["weights"].astype(np.float64) + model["bias"])


def logreg_train(model: Model, data: Arrays, params: Params) -> tuple[Model, Metrics]:
    x, y = _flat(data[0]), np.asarray(data[1], dtype=np.int64)
    w, b = model["weights"].astype(np.float64), model["bias"].astype(np.float64)
    hp: LogRegParams = _known(LogRegParams, params)
    lr, l2 = hp.learning_rate, hp.l2
    rng = np.random.default_rng(hp.seed)
    onehot = np.eye(N_CLASSES)[y]
    losses = []
    for _ in range(hp.epochs):
        for idx in _batches(len(y), hp.batch_size, rng):
            p = _softmax(x[idx] @ w + b)
            losses.append(float(-np.log(p[np.arange(len(idx)), y[idx]] + 1e-12).mean()))
            grad = (p - onehot[idx]) / len(idx)
            w -= lr * (x[idx].T @ grad + l2 * w)
            b -= lr * grad.sum(axis=0)
    trained = {"weights": w.astype(np.float32), "bias": b.astype(np.float32)}
    return trained, {"loss": float(np.mean(losses)) if losses else 0.0}


def logreg_validate(model: Model, data: Arrays, params: Params) -> Metrics:
    x, y = _flat(data[0]), np.asarray(data[1], dtype=np.int64)
    p = _softmax(_logreg_logits(model, x))
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    return {"accuracy": float((p.argmax(axis=1) == y).mean()), "loss": loss}


# -- a small MLP (one hidden ReLU layer) ------------------------------------------------

def mlp_init(params: Params) -> Model:
    hp: MLPParams = _known(MLPParams, params)
    hidden = hp.hidden
    rng = np.random.default_rng(hp.seed)
    return {
        "w1": (rng.standard_normal((N_FEATURES, hidden)) * np.sqrt(2 / N_FEATURES)).astype(
            np.float32),
        "b1": np.zeros(hidden, np.float32),
        "w2": (rng.standard_normal((hidden, N_CLASSES)) * np.sqrt(1 / hidden)).astype(
            np.float32),
        "b2": np.zeros(N_CLASSES, np.float32),
    }


def _mlp_forward(m: dict[str, npt.NDArray[np.float64]], x: npt.NDArray[np.float64]
                 ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    h = np.maximum(0.0, x @ m["w1"] + m["b1"])
    return h, _softmax(h @ m["w2"] + m["b2"])


def mlp_train(model: Model, data: Arrays, params: Params) -> tuple[Model, Metrics]:
    x, y = _flat(data[0]), np.asarray(data[1], dtype=np.int64)
    m = {k: v.astype(np.float64) for k, v in model.items()}
    hp: MLPParams = _known(MLPParams, params)
    lr = hp.learning_rate
    rng = np.random.default_rng(hp.seed)
    onehot = np.eye(N_CLASSES)[y]
    losses = []
    for _ in range(hp.epochs):
        for idx in _batches(len(y), hp.batch_size, rng):
            h, p = _mlp_forward(m, x[idx])
            losses.append(float(-np.log(p[np.arange(len(idx)), y[idx]] + 1e-12).mean()))
            g2 = (p - onehot[idx]) / len(idx)
            gh = (g2 @ m["w2"].T) * (h > 0)
            m["w2"] -= lr * h.T @ g2
            m["b2"] -= lr * g2.sum(axis=0)
            m["w1"] -= lr * x[idx].T @ gh
            m["b1"] -= lr * gh.sum(axis=0)
    return ({k: v.astype(np.float32) for k, v in m.items()},
            {"loss": float(np.mean(losses)) if losses else 0.0})


def mlp_validate(model: Model, data: Arrays, params: Params) -> Metrics:
    x, y = _flat(data[0]), np.asarray(data[1], dtype=np.int64)
    _, p = _mlp_forward({k: v.astype(np.float64) for k, v in model.items()}, x)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    return {"accuracy": float((p.argmax(axis=1) == y).mean()), "loss": loss}


BUILTIN_TASKS = {
    "digits-logreg": Task("digits-logreg", logreg_init, logreg_train, logreg_validate,
                          LogRegParams),
    "digits-mlp": Task("digits-mlp", mlp_init, mlp_train, mlp_validate, MLPParams),
}
