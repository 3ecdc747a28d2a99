"""OpenFL 1.6 interactive-API experiments, unchanged, on fedkube's director: the script of
tests/openfl_workspace run from the OpenFL virtualenv, as on OpenFL's own director
(tests/test_openfl_experiments.py), with OpenFL's envoys and with fedkube's."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from fedkube.dev.processes import Process, director_process, free_port
from tests.helpers import start
from tests.test_openfl_experiments import (
    SHARD_FILES,
    WORKSPACE,
    openfl_envoys,
    run_experiment,
    wait_director,
    wait_envoys_online,
)

pytestmark = pytest.mark.compat
ROUNDS = 5


def fedkube_envoys(tmp_path: Path, port: int, count: int, openfl_python: Path
                   ) -> list[Process]:
    """count fedkube envoys env1.. whose shard is the OpenFL envoys' own ShardDescriptor
    class (rank i of count), each run in a directory holding its module, as an OpenFL
    envoy's is."""
    envoys = []
    for rank in range(1, count + 1):
        name = f"env{rank}"
        home = tmp_path / f"{name}-home"
        home.mkdir(parents=True)
        for file in SHARD_FILES:
            shutil.copy(WORKSPACE / file, home / file)
        envoys.append(Process(name, [
            "envoy", "start", "--name", name, "--director", f"localhost:{port}",
            "--shard", "openfl:shard_descriptor.DigitsShardDescriptor",
            "--shard-option", f"rank_worldsize={rank},{count}", "--openfl-python",
            str(openfl_python), "--work-dir", str(tmp_path / name), "--insecure"],
            tmp_path / "logs" / f"{name}.log", cwd=home))
    return envoys


def check_openfl_run(result: dict[str, Any], collaborators: list[str],
                     reference: dict[str, Any]) -> None:
    """What OpenFL's frontend saw: the OpenFL metric names from every collaborator and
    the aggregator, every round, and trained models as accurate (held out) as those of
    the same experiment on OpenFL's own director, within 2 points."""
    metrics = [tuple(metric) for metric in result["metrics"]]
    names = {(origin, task, metric) for _, origin, task, metric, _ in metrics}
    for name in collaborators:
        assert (name, "train", "train_loss") in names
        for task in ("aggregated_model_validate", "locally_tuned_model_validate"):
            assert (name, task, "accuracy") in names
    aggregated = {r: v for r, origin, t, m, v in metrics
                  if (origin, t, m) == ("aggregator", "aggregated_model_validate", "accuracy")}
    assert set(aggregated) == set(range(ROUNDS))
    assert aggregated[ROUNDS - 1] > aggregated[0] + 0.4
    assert result["best_accuracy"] > result["initial_accuracy"] + 0.4
    assert result["last_accuracy"] > result["initial_accuracy"] + 0.4
    for model in ("best", "last"):
        assert abs(result[f"{model}_accuracy"] - reference[f"{model}_accuracy"]) <= 0.02


def test_openfl_experiment_with_openfl_envoys_on_our_director(
        tmp_path: Path, processes: list[Process], openfl_python: Path,
        openfl_reference: dict[str, Any]) -> None:
    port = free_port()
    start(processes, director_process(tmp_path, port, period=2))
    wait_director(port)  # an OpenFL envoy that finds no director exits
    envoys = [start(processes, envoy)
              for envoy in openfl_envoys(tmp_path, port, 2, openfl_python=openfl_python)]
    wait_envoys_online(openfl_python, port, [envoy.name for envoy in envoys])
    began = time.monotonic()
    result = run_experiment(openfl_python, tmp_path, port, "numpy_digits", rounds=ROUNDS)
    print(f"OpenFL envoys: experiment {time.monotonic() - began:.1f}s, best "
          f"{result['best_accuracy']:.4f}, last {result['last_accuracy']:.4f}; OpenFL's "
          f"director {openfl_reference['seconds']:.1f}s")
    check_openfl_run(result, [envoy.name for envoy in envoys], openfl_reference)


def test_openfl_experiment_with_our_envoys_on_our_director(
        tmp_path: Path, processes: list[Process], openfl_python: Path,
        openfl_reference: dict[str, Any]) -> None:
    port = free_port()
    start(processes, director_process(tmp_path, port, period=2))
    envoys = [start(processes, envoy)
              for envoy in fedkube_envoys(tmp_path, port, 2, openfl_python)]
    wait_envoys_online(openfl_python, port, [envoy.name for envoy in envoys])
    began = time.monotonic()
    result = run_experiment(openfl_python, tmp_path, port, "numpy_digits", rounds=ROUNDS)
    print(f"fedkube envoys: experiment {time.monotonic() - began:.1f}s, best "
          f"{result['best_accuracy']:.4f}, last {result['last_accuracy']:.4f}; OpenFL's "
          f"director {openfl_reference['seconds']:.1f}s")
    check_openfl_run(result, [envoy.name for envoy in envoys], openfl_reference)
