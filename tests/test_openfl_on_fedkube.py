"""OpenFL 1.6 interactive-API experiments, unchanged, on fedkube's director: the script of
tests/openfl_workspace run from the OpenFL virtualenv, as on OpenFL's own director
(tests/test_openfl_experiments.py), with OpenFL's envoys and with fedkube's."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedkube.dev.processes import Process, director_process, free_port
from tests.helpers import start
from tests.test_openfl_experiments import openfl_envoys, run_experiment, wait_envoys_online

pytestmark = pytest.mark.compat
ROUNDS = 5


def test_openfl_experiment_with_openfl_envoys_on_our_director(
        tmp_path: Path, processes: list[Process], openfl_python: Path) -> None:
    port = free_port()
    start(processes, director_process(tmp_path, port, period=2))
    envoys = [start(processes, envoy)
              for envoy in openfl_envoys(tmp_path, port, 2, openfl_python=openfl_python)]
    wait_envoys_online(openfl_python, port, [envoy.name for envoy in envoys])
    began = time.monotonic()
    result = run_experiment(openfl_python, tmp_path, port, "numpy_digits", rounds=ROUNDS)
    print(f"experiment {time.monotonic() - began:.1f}s")
    metrics = [tuple(metric) for metric in result["metrics"]]
    names = {(origin, task, metric) for _, origin, task, metric, _ in metrics}
    for envoy in envoys:
        assert (envoy.name, "train", "train_loss") in names
        for task in ("aggregated_model_validate", "locally_tuned_model_validate"):
            assert (envoy.name, task, "accuracy") in names
    aggregated = {r: v for r, origin, t, m, v in metrics
                  if (origin, t, m) == ("aggregator", "aggregated_model_validate", "accuracy")}
    assert set(aggregated) == set(range(ROUNDS))
    assert result["best_accuracy"] > 0.7 and result["last_accuracy"] > 0.7
