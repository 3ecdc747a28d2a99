"""An OpenFL 1.6 interactive-API experiment: a numpy MLP on the 8x8 digits.

Written as an OpenFL user writes one (Federation, FLExperiment, TaskInterface, ModelInterface,
DataInterface), for any director that speaks OpenFL's director protocol; everything that differs
between runs comes from the environment:

    DIRECTOR_HOST (localhost), DIRECTOR_PORT, CLIENT_ID (frontend): the director, TLS disabled
    unless CERT_CHAIN, API_CERT and API_KEY name the CA, the user's certificate and key
    EXPERIMENT_NAME, ROUNDS (5), AGGREGATION (weighted_average | median | adam | custom: a class of
    this script's own, which writes the file MARKER wherever it runs),
    DELTA_UPDATES ("1": on), OPT_TREATMENT (RESET), EPOCHS (2), LR (0.1), BATCH_SIZE (32),
    ENVOYS (a comma-separated subset of the online envoys to run on; default: all of them)

Run it with the OpenFL virtualenv's python, in a copy of this directory (the interactive API packs
the working directory into the experiment archive). The last line it prints is JSON:
{"metrics": [[round, origin, task, name, value], ...], "best_accuracy": ..., "last_accuracy": ...,
"initial_accuracy": ...}, the accuracies on a held-out test set that no shard has.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

import digits_data
import numpy as np
import numpy.typing as npt
from numpy_model import MLP, SGD, Array, NumpyAdapter, features
from openfl.interface.aggregation_functions import (
    AdamAdaptiveAggregation,
    AggregationFunction,
    Median,
    WeightedAverage,
)
from openfl.interface.interactive_api.experiment import (
    DataInterface,
    FLExperiment,
    ModelInterface,
    ModelStatus,
    TaskInterface,
)
from openfl.interface.interactive_api.federation import Federation

DIRECTOR_HOST = os.environ.get("DIRECTOR_HOST", "localhost")
DIRECTOR_PORT = int(os.environ["DIRECTOR_PORT"])
CLIENT_ID = os.environ.get("CLIENT_ID", "frontend")
EXPERIMENT_NAME = os.environ.get("EXPERIMENT_NAME", "numpy_digits")
ROUNDS = int(os.environ.get("ROUNDS", "5"))
AGGREGATION = os.environ.get("AGGREGATION", "weighted_average")
DELTA_UPDATES = os.environ.get("DELTA_UPDATES", "0") == "1"
OPT_TREATMENT = os.environ.get("OPT_TREATMENT", "RESET")
EPOCHS = int(os.environ.get("EPOCHS", "2"))
LR = float(os.environ.get("LR", "0.1"))
BATCH_SIZE = int(os.environ.get("BATCH_SIZE", "32"))



class MarkedAverage(AggregationFunction):  # type: ignore[misc]
    """The owner's own aggregation function: a weighted average that leaves a mark (the
    host it ran on) in the file MARKER, so a test can tell where it ran."""

    def call(self, local_tensors: Any, *_: Any) -> Any:
        with open(os.environ["MARKER"], "a") as marker:
            marker.write(f"{socket.gethostname()} {os.getpid()}\n")
        tensors, weights = zip(*[(x.tensor, x.weight) for x in local_tensors], strict=True)
        return np.average(tensors, weights=weights, axis=0)


AGGREGATIONS: dict[str, Any] = {
    "weighted_average": WeightedAverage, "median": Median, "custom": MarkedAverage,
    # A server-side Adam over the initial model's tensors (MLP(seed=0), as in main()).
    "adam": lambda: AdamAdaptiveAggregation(
        params=NumpyAdapter.get_tensor_dict(MLP(seed=0)), learning_rate=0.05)}
logger = logging.getLogger("experiment")


# Data: what the envoy's shard descriptor holds, as numpy arrays.

def as_arrays(dataset: Any) -> tuple[Array, npt.NDArray[np.int64]]:
    """Any OpenFL ShardDataset of (8x8 image, label) pairs -> (n, 64) features, (n,) labels."""
    pairs = [dataset[index] for index in range(len(dataset))]
    images = np.stack([np.asarray(image, dtype=np.float32) for image, _ in pairs])
    labels = np.asarray([int(np.asarray(label).reshape(-1)[0]) for _, label in pairs],
                        dtype=np.int64)
    return features(images), labels


class Loader:
    """Minibatches of (x, y), reshuffled each pass with a seeded generator."""

    def __init__(self, x: Array, y: npt.NDArray[np.int64], batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rng = np.random.RandomState(seed)

    def __len__(self) -> int:
        return len(self.y)

    def __iter__(self) -> Iterator[tuple[Array, npt.NDArray[np.int64]]]:
        order = self.rng.permutation(len(self.y))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            yield self.x[batch], self.y[batch]


class DigitsData(DataInterface):
    """The collaborator's data, from the shard descriptor its envoy was started with."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.train_loaders_made = 0

    @property
    def shard_descriptor(self) -> Any:
        return self._shard_descriptor

    @shard_descriptor.setter
    def shard_descriptor(self, shard_descriptor: Any) -> None:
        self._shard_descriptor = shard_descriptor
        self.train_set = as_arrays(shard_descriptor.get_dataset("train"))
        self.valid_set = as_arrays(shard_descriptor.get_dataset("val"))

    def get_train_loader(self, **kwargs: Any) -> Loader:
        self.train_loaders_made += 1  # one per train task: a new, deterministic order
        return Loader(*self.train_set, batch_size=self.kwargs["batch_size"],
                      seed=self.train_loaders_made)

    def get_valid_loader(self, **kwargs: Any) -> Loader:
        return Loader(*self.valid_set, batch_size=self.kwargs["batch_size"], seed=0)

    def get_train_data_size(self) -> int:
        return len(self.train_set[1])

    def get_valid_data_size(self) -> int:
        return len(self.valid_set[1])


# Tasks, run by the collaborators.

task_interface = TaskInterface()
if AGGREGATION not in AGGREGATIONS:
    sys.exit(f"AGGREGATION={AGGREGATION!r}: one of {sorted(AGGREGATIONS)}")


@task_interface.set_aggregation_function(AGGREGATIONS[AGGREGATION]())
@task_interface.add_kwargs(epochs=EPOCHS, lr=LR)
@task_interface.register_fl_task(model="model", data_loader="train_loader", device="device",
                                 optimizer="optimizer")
def train(model: MLP, train_loader: Loader, optimizer: SGD, device: str, epochs: int = 1,
          lr: float = 0.1) -> dict[str, float]:
    losses = []
    for _ in range(epochs):
        for x, y in train_loader:
            loss, grads = model.loss_and_grads(x, y)
            optimizer.step(model, grads, lr=lr)
            losses.append(loss)
    return {"train_loss": float(np.mean(losses))}


@task_interface.register_fl_task(model="model", data_loader="val_loader", device="device")
def validate(model: MLP, val_loader: Loader, device: str) -> dict[str, float]:
    return {"accuracy": model.accuracy(val_loader.x, val_loader.y)}


def main() -> None:
    test_x, test_y = digits_data.held_out()
    test_x_features = features(test_x)

    model = MLP(seed=0)
    initial_accuracy = model.accuracy(test_x_features, test_y)
    model_interface = ModelInterface(model=model, optimizer=SGD(lr=LR),
                                     framework_plugin="numpy_model.NumpyAdapter")
    data = DigitsData(batch_size=BATCH_SIZE)

    tls = {"tls": True, "cert_chain": os.environ["CERT_CHAIN"],
           "api_cert": os.environ["API_CERT"], "api_private_key": os.environ["API_KEY"]
           } if os.environ.get("CERT_CHAIN") else {"tls": False}
    federation = Federation(client_id=CLIENT_ID, director_node_fqdn=DIRECTOR_HOST,
                            director_port=DIRECTOR_PORT, **tls)
    if os.environ.get("ENVOYS"):
        # FLExperiment runs on every online envoy; this experiment wants some of them.
        wanted, registry = set(os.environ["ENVOYS"].split(",")), federation.get_shard_registry
        federation.get_shard_registry = lambda: {
            name: info for name, info in registry().items() if name in wanted}
    fl_experiment = FLExperiment(federation=federation, experiment_name=EXPERIMENT_NAME)
    logger.info("Shards: %s", federation.get_shard_registry())
    fl_experiment.start(model_provider=model_interface, task_keeper=task_interface,
                        data_loader=data, rounds_to_train=ROUNDS, delta_updates=DELTA_UPDATES,
                        opt_treatment=OPT_TREATMENT)
    if not fl_experiment.experiment_submitted:
        sys.exit(f"the director did not accept experiment {EXPERIMENT_NAME}")

    # FLExperiment.stream_metrics() only logs what the director streams: read the same stream,
    # which ends when the aggregator has sent every collaborator its quit job.
    metrics = []
    for metric in fl_experiment.federation.dir_client.stream_metrics(EXPERIMENT_NAME):
        logger.info("Round %s, %s %s result %s:\t%f", metric["round"], metric["metric_origin"],
                    metric["task_name"], metric["metric_name"], metric["metric_value"])
        metrics.append([metric["round"], metric["metric_origin"], metric["task_name"],
                        metric["metric_name"], metric["metric_value"]])
    logger.info("Experiment status: %s", fl_experiment.get_experiment_status())

    accuracies = {}
    for which, get_model, status in (("best", fl_experiment.get_best_model, ModelStatus.BEST),
                                     ("last", fl_experiment.get_last_model, ModelStatus.LAST)):
        trained = get_model()
        if fl_experiment.current_model_status != status:
            sys.exit(f"no {which} model from the director")
        accuracies[which] = trained.accuracy(test_x_features, test_y)

    print(json.dumps({"metrics": metrics, "best_accuracy": accuracies["best"],
                      "last_accuracy": accuracies["last"],
                      "initial_accuracy": initial_accuracy}), flush=True)


if __name__ == "__main__":
    main()
