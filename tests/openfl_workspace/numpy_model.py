"""A numpy MLP, its SGD optimizer and the OpenFL framework adapter for them.

No torch, no tensorflow: the model is a dict of float32 arrays, so the adapter that OpenFL's
task runner calls (`framework_plugin="numpy_model.NumpyAdapter"`) only copies arrays in and out.
The module travels in the experiment archive; the collaborators import it from there.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]


def features(images: npt.NDArray[np.floating]) -> Array:
    """(n, 8, 8) pixel values 0..16 -> (n, 64) in 0..1."""
    flat: Array = np.asarray(images, dtype=np.float32).reshape(len(images), -1) / np.float32(16)
    return flat


class MLP:
    """sizes[0] -> sizes[1] (ReLU) -> sizes[2] logits; softmax cross-entropy."""

    def __init__(self, sizes: tuple[int, int, int] = (64, 32, 10), seed: int = 0) -> None:
        rng = np.random.RandomState(seed)
        n_in, n_hidden, n_out = sizes
        self.params: dict[str, Array] = {
            "fc1.weight": (rng.randn(n_in, n_hidden) * np.sqrt(2.0 / n_in)).astype(np.float32),
            "fc1.bias": np.zeros(n_hidden, dtype=np.float32),
            "fc2.weight": (rng.randn(n_hidden, n_out) * np.sqrt(1.0 / n_hidden)
                           ).astype(np.float32),
            "fc2.bias": np.zeros(n_out, dtype=np.float32),
        }

    def logits(self, x: Array) -> Array:
        hidden = np.maximum(x @ self.params["fc1.weight"] + self.params["fc1.bias"], 0)
        logits: Array = hidden @ self.params["fc2.weight"] + self.params["fc2.bias"]
        return logits

    def predict(self, x: Array) -> npt.NDArray[np.int64]:
        return np.asarray(np.argmax(self.logits(x), axis=1), dtype=np.int64)

    def accuracy(self, x: Array, y: npt.NDArray[np.int64]) -> float:
        return float(np.mean(self.predict(x) == y)) if len(y) else 0.0

    def loss_and_grads(self, x: Array, y: npt.NDArray[np.int64]) -> tuple[float, dict[str, Array]]:
        """Mean cross-entropy of the batch and its gradients by parameter."""
        pre = x @ self.params["fc1.weight"] + self.params["fc1.bias"]
        hidden = np.maximum(pre, 0)
        logits = hidden @ self.params["fc2.weight"] + self.params["fc2.bias"]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        n = len(y)
        loss = float(-log_probs[np.arange(n), y].mean())
        d_logits = np.exp(log_probs)
        d_logits[np.arange(n), y] -= 1
        d_logits /= n
        d_hidden = (d_logits @ self.params["fc2.weight"].T) * (pre > 0)
        grads = {"fc1.weight": x.T @ d_hidden, "fc1.bias": d_hidden.sum(axis=0),
                 "fc2.weight": hidden.T @ d_logits, "fc2.bias": d_logits.sum(axis=0)}
        return loss, {name: g.astype(np.float32) for name, g in grads.items()}


class SGD:
    """Plain stochastic gradient descent: no state, so nothing of it is aggregated."""

    def __init__(self, lr: float = 0.1) -> None:
        self.lr = lr

    def step(self, model: MLP, grads: Mapping[str, Array], lr: float | None = None) -> None:
        rate = np.float32(self.lr if lr is None else lr)
        for name, grad in grads.items():
            model.params[name] = model.params[name] - rate * grad


class NumpyAdapter:
    """OpenFL framework adapter (FrameworkAdapterPluginInterface's static methods)."""

    def __init__(self) -> None:
        pass

    @staticmethod
    def serialization_setup() -> None:
        """Nothing to prepare: the model pickles as it is."""

    @staticmethod
    def get_tensor_dict(model: MLP, optimizer: SGD | None = None) -> dict[str, Array]:
        """The model's tensors, copied; SGD adds none."""
        return {name: np.array(value, dtype=np.float32, copy=True)
                for name, value in model.params.items()}

    @staticmethod
    def set_tensor_dict(model: MLP, tensor_dict: Mapping[str, npt.ArrayLike],
                        optimizer: SGD | None = None, device: str = "cpu") -> None:
        """Loads the model's tensors from tensor_dict, in place; other entries are ignored."""
        for name, value in model.params.items():
            model.params[name] = np.array(tensor_dict[name], dtype=np.float32
                                          ).reshape(value.shape)
