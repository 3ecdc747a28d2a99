"""A PyTorch CNN on the 8x8 digits, trained on CUDA when the envoy's node has a GPU.

Submit with its requirements, which each envoy installs into the experiment's own
virtualenv:
    fedkube experiment submit --director HOST:PORT --insecure --name cnn --archive task.py \
        --requirements requirements.txt --rounds 5
torch is imported inside the functions: `init_model` also runs where the experiment is
submitted, and builds the initial weights from numpy alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CLASSES = 10
# name -> shape, in the order of the network's state_dict
SHAPES = {"conv1.weight": (16, 1, 3, 3), "conv1.bias": (16,),
          "conv2.weight": (32, 16, 3, 3), "conv2.bias": (32,),
          "head.weight": (CLASSES, 32 * 2 * 2), "head.bias": (CLASSES,)}


def init_model(params: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(params.get("seed", 0)))
    model = {}
    for name, shape in SHAPES.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = np.sqrt(2.0 / fan_in) if name.endswith("weight") else 0.0
        model[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    return model


def _network(model: dict[str, np.ndarray]) -> tuple[Any, Any]:
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.head = nn.Linear(32 * 2 * 2, CLASSES)

        def forward(self, x: Any) -> Any:
            x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)   # 8x8 -> 4x4
            x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)   # 4x4 -> 2x2
            return self.head(x.flatten(1))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = Net()
    # A copy: the arrays may be read-only views of the received model (torch warns on
    # those), and load_state_dict copies into the parameters anyway.
    net.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in model.items()})
    return net.to(device), device


def _tensors(data: tuple[np.ndarray, np.ndarray], device: Any) -> tuple[Any, Any]:
    import torch

    x = torch.from_numpy(np.asarray(data[0], np.float32).reshape(-1, 1, 8, 8))  # in [0, 1]
    y = torch.from_numpy(np.asarray(data[1], np.int64))
    return x.to(device), y.to(device)


def train(model: dict[str, np.ndarray], data: tuple[np.ndarray, np.ndarray],
          params: dict) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    import torch

    torch.manual_seed(int(params.get("seed", 0)))
    net, device = _network(model)
    x, y = _tensors(data, device)
    optimizer = torch.optim.SGD(net.parameters(), lr=float(params.get("learning_rate", 0.05)),
                                momentum=0.9)
    losses = []
    net.train()
    for _ in range(int(params.get("epochs", 2))):
        for batch in torch.randperm(len(y), device=device).split(32):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    updated = {k: v.detach().cpu().numpy().astype(np.float32)
               for k, v in net.state_dict().items()}
    return updated, {"loss": float(np.mean(losses)), "cuda": float(device.type == "cuda")}


def validate(model: dict[str, np.ndarray], data: tuple[np.ndarray, np.ndarray],
             params: dict) -> dict[str, float]:
    import torch

    net, device = _network(model)
    x, y = _tensors(data, device)
    net.eval()
    with torch.no_grad():
        logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
    return {"accuracy": float((logits.argmax(1) == y).float().mean()), "loss": float(loss)}
