"""A user task: softmax regression trained with momentum and a decaying learning rate.

Submit it with
    fedkube experiment submit --director HOST:PORT --insecure --name mine --archive task.py \
        --rounds 10 --param learning_rate=0.5
(--ca/--cert/--key instead of --insecure under mTLS). Each envoy imports this module from
the experiment's archive and calls the three functions on its own shard; the model is a
dict of float32 arrays. PARAMS declares the parameters it takes, with their defaults:
`submit` refuses other names, and values of other types, before sending anything.
"""

from __future__ import annotations

import numpy as np

CLASSES = 10
PARAMS = {"features": 64, "seed": 0, "learning_rate": 0.5, "momentum": 0.9, "epochs": 1}


def init_model(params: dict) -> dict[str, np.ndarray]:
    features = int(params.get("features", 64))
    rng = np.random.default_rng(int(params.get("seed", 0)))
    return {"w": (rng.standard_normal((features, CLASSES)) * 0.01).astype(np.float32),
            "b": np.zeros(CLASSES, np.float32)}


def _probabilities(model: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    z = x @ model["w"] + model["b"]
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def train(model: dict[str, np.ndarray], data: tuple[np.ndarray, np.ndarray],
          params: dict) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    x = data[0].reshape(len(data[0]), -1).astype(np.float64)
    y = np.asarray(data[1], dtype=np.int64)
    w, b = model["w"].astype(np.float64), model["b"].astype(np.float64)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    rate, momentum = float(params.get("learning_rate", 0.5)), float(params.get("momentum", 0.9))
    rng = np.random.default_rng(int(params.get("seed", 0)))
    losses = []
    for epoch in range(int(params.get("epochs", 1))):
        step = rate / (1 + epoch)
        order = rng.permutation(len(y))
        for start in range(0, len(y), 32):
            batch = order[start:start + 32]
            p = _probabilities({"w": w, "b": b}, x[batch])
            losses.append(float(-np.log(p[np.arange(len(batch)), y[batch]] + 1e-12).mean()))
            p[np.arange(len(batch)), y[batch]] -= 1
            vw = momentum * vw - step * (x[batch].T @ p) / len(batch)
            vb = momentum * vb - step * p.mean(axis=0)
            w, b = w + vw, b + vb
    return ({"w": w.astype(np.float32), "b": b.astype(np.float32)},
            {"loss": float(np.mean(losses))})


def validate(model: dict[str, np.ndarray], data: tuple[np.ndarray, np.ndarray],
             params: dict) -> dict[str, float]:
    x = data[0].reshape(len(data[0]), -1).astype(np.float64)
    y = np.asarray(data[1], dtype=np.int64)
    p = _probabilities(model, x)
    return {"accuracy": float((p.argmax(axis=1) == y).mean()),
            "loss": float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())}
