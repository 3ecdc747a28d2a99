"""OpenFL 1.6 interactive-API experiments, unchanged, on fedkube's director: the script of
tests/openfl_workspace run from the OpenFL virtualenv, as on OpenFL's own director
(tests/test_openfl_experiments.py), with OpenFL's envoys and with fedkube's; held to the
same experiment's results on OpenFL's director."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fedkube.client.director_client import DirectorClient
from fedkube.dev.processes import Process, director_process, free_port, wait_for
from tests.helpers import CertDir, current_round, start, write_policy
from tests.test_openfl_compat import openfl_client
from tests.test_openfl_experiments import (
    SHARD_FILES,
    WORKSPACE,
    References,
    openfl_envoys,
    run_experiment,
    wait_director,
    wait_envoys_online,
)

pytestmark = pytest.mark.compat
ROUNDS = 5
FRONTEND = "alice"  # the scripts' client_id (and openfl_client's): the experiments' owner


def fedkube_envoys(tmp_path: Path, port: int, count: int, openfl_python: Path, *,
                   first: int = 1, shards: int | None = None,
                   cert_dir: Path | None = None) -> list[Process]:
    """fedkube envoys env<first>.. whose shard is the OpenFL envoys' own ShardDescriptor
    class (rank i of shards), each run in a directory holding its module, as an OpenFL
    envoy's is; under mTLS with its certificate, named relative to that directory."""
    envoys = []
    # An OpenFL experiment is its owner's code, with its workspace's requirements.txt:
    # these data owners allow both.
    policy = write_policy(tmp_path, {"userCode": True, "requirements": True},
                          name=f"policy-{first}")
    for rank in range(first, first + count):
        name = f"env{rank}"
        home = tmp_path / f"{name}-home"
        home.mkdir(parents=True)
        for file in SHARD_FILES:
            shutil.copy(WORKSPACE / file, home / file)
        tls = ["--insecure"] if cert_dir is None else [
            arg for flag, file in (("--ca", "ca.crt"), ("--cert", f"{name}.crt"),
                                   ("--key", f"{name}.key"))
            for arg in (flag, os.path.relpath(cert_dir / file, home))]
        envoys.append(Process(name, [
            "envoy", "start", "--name", name, "--director", f"localhost:{port}",
            "--shard", "openfl:shard_descriptor.DigitsShardDescriptor",
            "--shard-option", f"rank_worldsize={rank},{shards or count}", "--openfl-python",
            str(openfl_python), "--work-dir", str(tmp_path / name), "--policy", str(policy),
            *tls],
            tmp_path / "logs" / f"{name}.log", cwd=home))
    return envoys


def federation(tmp_path: Path, processes: list[Process], openfl_python: Path, *,
               envoys: str, count: int = 2) -> tuple[int, list[str]]:
    """fedkube's director and count envoys (OpenFL's or fedkube's), all online; its port and
    the envoys' names."""
    port = free_port()
    start(processes, director_process(tmp_path, port, period=2))
    wait_director(port)  # an OpenFL envoy that finds no director exits
    made = (openfl_envoys(tmp_path, port, count, openfl_python=openfl_python)
            if envoys == "openfl" else fedkube_envoys(tmp_path, port, count, openfl_python))
    names = [start(processes, envoy).name for envoy in made]
    wait_envoys_online(openfl_python, port, names)
    return port, names


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


@pytest.mark.parametrize("envoys", ["openfl", "fedkube"])
def test_the_same_openfl_experiment_runs_on_our_director(
        tmp_path: Path, processes: list[Process], openfl_python: Path,
        openfl_references: References, envoys: str) -> None:
    port, names = federation(tmp_path, processes, openfl_python, envoys=envoys)
    began = time.monotonic()
    result = run_experiment(openfl_python, tmp_path, port, "numpy_digits", rounds=ROUNDS)
    reference = openfl_references.get()
    print(f"{envoys} envoys on fedkube: experiment {time.monotonic() - began:.1f}s, best "
          f"{result['best_accuracy']:.4f}, last {result['last_accuracy']:.4f}; on OpenFL's "
          f"director {reference['seconds']:.1f}s, best {reference['best_accuracy']:.4f}, "
          f"last {reference['last_accuracy']:.4f}")
    check_openfl_run(result, names, reference)


def test_the_openfl_experiment_under_mtls(
        tmp_path: Path, processes: list[Process], openfl_python: Path, cert_dir: CertDir,
        openfl_references: References) -> None:
    """The frontend with an owner's certificate (OpenFL's Federation(tls=True, ...)),
    fedkube envoys with theirs: OpenFL's collaborator dials the director's port with the
    envoy's certificate, and fedkube's roles and identities apply."""
    port = free_port()
    start(processes, director_process(tmp_path, port, period=2, cert_dir=cert_dir.path))
    made = fedkube_envoys(tmp_path, port, 2, openfl_python, cert_dir=cert_dir.path)
    names = [start(processes, envoy).name for envoy in made]
    with DirectorClient.from_files(f"localhost:{port}", ca=cert_dir.path / "ca.crt",
                                   cert=cert_dir.path / "root.crt",
                                   key=cert_dir.path / "root.key") as admin:
        admin.wait_online(2, timeout=120)
    result = run_experiment(
        openfl_python, tmp_path, port, "numpy_digits", rounds=ROUNDS, client_id="alice",
        cert_chain=cert_dir.path / "ca.crt", api_cert=cert_dir.path / "alice.crt",
        api_key=cert_dir.path / "alice.key")
    check_openfl_run(result, names, openfl_references.get())


@pytest.mark.parametrize(("count", "settings"), [
    (3, {"aggregation": "median"}),  # three shards: the median is not the mean
    (2, {"aggregation": "adam"}),
    (2, {"delta_updates": True}),
], ids=["median", "adam", "delta-updates"])
def test_openfl_aggregation_and_delta_updates_as_on_openfl(
        tmp_path: Path, processes: list[Process], openfl_python: Path,
        openfl_references: References, count: int, settings: dict[str, Any]) -> None:
    port, names = federation(tmp_path, processes, openfl_python, envoys="openfl", count=count)
    result = run_experiment(openfl_python, tmp_path, port, "numpy_digits", rounds=ROUNDS,
                            **settings)
    reference = openfl_references.get(count, **settings)
    print(f"{settings}: best {result['best_accuracy']:.4f} (OpenFL "
          f"{reference['best_accuracy']:.4f}), last {result['last_accuracy']:.4f} (OpenFL "
          f"{reference['last_accuracy']:.4f})")
    check_openfl_run(result, names, reference)
    if "aggregation" in settings:  # the setting took effect: not the weighted average's
        plain = openfl_references.get(count)
        assert result["last_accuracy"] != plain["last_accuracy"]


def start_script(openfl_python: Path, tmp_path: Path, port: int, name: str,
                 **settings: str) -> subprocess.Popen[str]:
    """experiment.py started (not waited for) in a fresh copy of the workspace."""
    workspace = tmp_path / f"frontend-{name}"
    shutil.copytree(WORKSPACE, workspace, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DIRECTOR_PORT": str(port),
           "EXPERIMENT_NAME": name, "CLIENT_ID": FRONTEND,
           **{k.upper(): v for k, v in settings.items()}}
    with (workspace / "out.log").open("w") as log:
        return subprocess.Popen([str(openfl_python), "experiment.py"], cwd=workspace,
                                env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def trained_models(openfl_python: Path, port: int, name: str) -> dict[str, int]:
    """How many tensors OpenFL's frontend client gets as the experiment's best and last
    models."""
    return dict(openfl_client(openfl_python, port, (
        f"print(json.dumps({{k: len(getattr(client, f'get_{{k}}_model')('{name}')) "
        f"for k in ('best', 'last')}}))")))


def test_a_director_killed_mid_experiment_resumes_it(
        tmp_path: Path, processes: list[Process], openfl_python: Path) -> None:
    """SIGKILL at round 2, then a director on the same port and data: the experiment goes
    on from its last closed round and finishes (OpenFL's director loses it)."""
    port, _ = federation(tmp_path, processes, openfl_python, envoys="fedkube")
    script = start_script(openfl_python, tmp_path, port, "resumed", rounds="8")
    client = DirectorClient(f"localhost:{port}", client_id=FRONTEND, timeout=10)
    try:
        wait_for(lambda: current_round(client, "resumed") >= 2, timeout=120,
                 message="round 2 of the OpenFL experiment")
        director = processes[0]
        director.kill()
        director.stop()
        start(processes, director_process(tmp_path, port, period=2, name="director-again"))
        wait_for(lambda: current_round(client, "resumed") >= 2, timeout=60,
                 message="the experiment back after the restart")
        wait_for(lambda: client.status("resumed").status == "finished", timeout=180,
                 message="the resumed experiment finished")
        view = client.status("resumed")
        assert (view.round, view.total_rounds) == (8, 8)
        assert float(view.best_metrics[view.metric]) > 0.7
        events = list(client.metrics("resumed"))
    finally:
        client.close()
        script.kill()
        script.wait()
    aggregated = {e.round for e in events
                  if (e.origin, e.task) == ("aggregator", "aggregated_model_validate")}
    assert aggregated == set(range(8))
    # OpenFL's own frontend client reads both models back.
    assert trained_models(openfl_python, port, "resumed") == {"best": 4, "last": 4}


def test_two_openfl_experiments_on_disjoint_envoys_run_at_once(
        tmp_path: Path, processes: list[Process], openfl_python: Path) -> None:
    port = free_port()
    start(processes, director_process(tmp_path, port, period=2))
    wait_director(port)
    made = fedkube_envoys(tmp_path, port, 4, openfl_python)
    names = [start(processes, envoy).name for envoy in made]
    wait_envoys_online(openfl_python, port, names)
    scripts = {name: start_script(openfl_python, tmp_path, port, name, rounds="20",
                                  envoys=",".join(group))
               for name, group in (("first", names[:2]), ("second", names[2:]))}
    client = DirectorClient(f"localhost:{port}", client_id=FRONTEND, timeout=10)
    try:
        # Both past their first round at the same time: neither waited for the other.
        wait_for(lambda: all(current_round(client, n) >= 1 for n in scripts), timeout=120,
                 message="both experiments in progress at once")
        statuses = {n: client.status(n).status for n in scripts}
        assert statuses == {"first": "in_progress", "second": "in_progress"}
        for name, script in scripts.items():
            assert script.wait(timeout=240) == 0, name
            assert client.status(name).status == "finished"
    finally:
        client.close()
        for script in scripts.values():
            script.kill()
            script.wait()


def test_an_owners_aggregation_function_never_runs_in_the_director(
        tmp_path: Path, processes: list[Process], openfl_python: Path) -> None:
    """The experiment's own AggregationFunction class writes a marker file wherever it
    runs: the director refuses the experiment, naming the class, and nothing ran."""
    port, _ = federation(tmp_path, processes, openfl_python, envoys="openfl")
    marker = tmp_path / "ran-here"
    script = start_script(openfl_python, tmp_path, port, "custom", aggregation="custom",
                          marker=str(marker))
    assert script.wait(timeout=120) != 0
    output = (tmp_path / "frontend-custom" / "out.log").read_text()
    assert "INVALID_ARGUMENT" in output
    assert "custom aggregation function 'MarkedAverage'" in output
    assert "does not run" in output
    assert not marker.exists()
    # Refused at submission: the director holds nothing of it.
    listed = openfl_client(openfl_python, port, "print(json.dumps([e.name for e in "
                           "client.get_experiments_list()]))")
    assert listed == []
