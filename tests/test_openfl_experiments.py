"""OpenFL 1.6 interactive-API experiments (tests/openfl_workspace), run as an OpenFL user runs
them: the script, unchanged, from the OpenFL virtualenv against a director and OpenFL envoys.

The helpers here take the director only as a port, so the same script and envoys run against
OpenFL's own director (this file) or any other that speaks its protocol.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fedkube.dev.processes import Process, free_port, port_open, wait_for
from tests.conftest import DEFAULT_OPENFL_PYTHON
from tests.test_openfl_compat import ENVOYS_JSON, OpenFLProcess, openfl_client

pytestmark = pytest.mark.compat

WORKSPACE = Path(__file__).parent / "openfl_workspace"
SHARD_FILES = ("shard_descriptor.py", "digits_data.py")  # what an envoy's workspace needs
SAMPLE_SHAPE, TARGET_SHAPE = ["8", "8"], ["1"]  # the shard descriptor's, as strings
HEALTH_CHECK_PERIOD = 5  # seconds


def default_openfl_python() -> Path:
    """The OpenFL virtualenv's interpreter, found as the `openfl_python` fixture finds it."""
    return Path(os.environ.get("FEDKUBE_OPENFL_PYTHON", DEFAULT_OPENFL_PYTHON))


def openfl_director(tmp_path: Path, port: int, *, openfl_python: Path | None = None
                    ) -> Process:
    """OpenFL's own director on localhost:port, TLS disabled (not started)."""
    workspace = tmp_path / "openfl-director"
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / "director_config.yaml").write_text(
        f"settings:\n  listen_host: localhost\n  listen_port: {port}\n"
        f"  sample_shape: {json.dumps(SAMPLE_SHAPE)}\n"
        f"  target_shape: {json.dumps(TARGET_SHAPE)}\n"
        f"  envoy_health_check_period: {HEALTH_CHECK_PERIOD}\n"
        "  install_requirements: false\n")
    fx = (openfl_python or default_openfl_python()).parent / "fx"
    return OpenFLProcess("openfl-director", fx, [
        "director", "start", "--disable-tls", "-c", "director_config.yaml"], workspace)


def openfl_envoys(tmp_path: Path, port: int, count: int, *,
                  openfl_python: Path | None = None) -> list[Process]:
    """count OpenFL envoys ofl-env1.. for the director on localhost:port, TLS disabled, each
    in its own workspace with the digits shard rank i of count (not started). They install
    no experiment requirements: the virtualenv has what the experiment needs."""
    fx = (openfl_python or default_openfl_python()).parent / "fx"
    envoys: list[Process] = []
    for rank in range(1, count + 1):
        name = f"ofl-env{rank}"
        workspace = tmp_path / name
        workspace.mkdir(parents=True, exist_ok=True)
        for file in SHARD_FILES:
            shutil.copy(WORKSPACE / file, workspace / file)
        (workspace / "envoy_config.yaml").write_text(
            "params:\n  cuda_devices: []\n  install_requirements: false\n"
            "shard_descriptor:\n  template: shard_descriptor.DigitsShardDescriptor\n"
            f"  params:\n    rank_worldsize: \"{rank},{count}\"\n")
        envoys.append(OpenFLProcess(name, fx, [
            "envoy", "start", "-n", name, "--disable-tls", "-dh", "localhost",
            "-dp", str(port), "-ec", "envoy_config.yaml"], workspace))
    return envoys


def wait_director(port: int) -> None:
    wait_for(lambda: port_open(port), timeout=60, message=f"a director on port {port}")


def wait_envoys_online(openfl_python: Path, port: int, names: list[str], *,
                       timeout: float = 120) -> None:
    """Until OpenFL's DirectorClient.get_envoys() shows exactly these envoys, all online."""
    wait_for(lambda: port_open(port), timeout=timeout, message=f"a director on port {port}")
    expected = dict.fromkeys(names, True)
    wait_for(lambda: openfl_client(openfl_python, port, ENVOYS_JSON) == expected,
             timeout=timeout, interval=0.5, message=f"envoys {names} online")


def run_experiment(openfl_python: Path, tmp_path: Path, port: int, name: str, *,
                   timeout: float = 300, **settings: Any) -> dict[str, Any]:
    """Runs tests/openfl_workspace/experiment.py in a fresh copy of that directory against the
    director on localhost:port as experiment `name`; settings become its environment
    (rounds=5 -> ROUNDS=5, delta_updates=True -> DELTA_UPDATES=1). Returns its JSON result."""
    workspace = tmp_path / f"frontend-{name}"
    shutil.copytree(WORKSPACE, workspace, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DIRECTOR_HOST": "localhost",
           "DIRECTOR_PORT": str(port), "EXPERIMENT_NAME": name}
    for key, value in settings.items():
        env[key.upper()] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    try:
        result = subprocess.run([str(openfl_python), "experiment.py"], cwd=workspace, env=env,
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"experiment.py still running after {timeout}s\n--- stdout ---\n"
                    f"{_text(exc.stdout)[-3000:]}\n--- stderr ---\n{_text(exc.stderr)[-3000:]}")
    (workspace / "experiment.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (
        f"experiment.py exited {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}"
        f"\n--- stderr ---\n{result.stderr[-3000:]}")
    last = [line for line in result.stdout.splitlines() if line.startswith('{"metrics"')]
    assert last, f"no JSON result line\n{result.stdout[-3000:]}"
    parsed: dict[str, Any] = json.loads(last[-1])
    return parsed


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


class References:
    """Runs of the experiment on OpenFL's own director with OpenFL envoys (5 rounds), each
    setting run once per session: what the same experiment on fedkube's director is held
    to. A run's result has, besides the script's JSON, `envoys` (their names) and
    `seconds` (the experiment's wall time)."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, openfl_python: Path) -> None:
        self.tmp_path_factory, self.openfl_python = tmp_path_factory, openfl_python
        self.runs: dict[tuple[int, tuple[tuple[str, Any], ...]], dict[str, Any]] = {}

    def get(self, envoys: int = 2, **settings: Any) -> dict[str, Any]:
        key = (envoys, tuple(sorted(settings.items())))
        if key not in self.runs:
            self.runs[key] = self._run(envoys, settings)
        return self.runs[key]

    def _run(self, count: int, settings: dict[str, Any]) -> dict[str, Any]:
        tmp_path = self.tmp_path_factory.mktemp("openfl-reference")
        python = self.openfl_python
        started: list[Process] = []
        try:
            port = free_port()
            started.append(openfl_director(tmp_path, port, openfl_python=python).start())
            wait_director(port)  # an OpenFL envoy that finds no director exits
            envoys = openfl_envoys(tmp_path, port, count, openfl_python=python)
            started += [envoy.start() for envoy in envoys]
            wait_envoys_online(python, port, [envoy.name for envoy in envoys])
            began = time.monotonic()
            result = run_experiment(python, tmp_path, port, "numpy_digits", rounds=5,
                                    **settings)
            return {**result, "envoys": [envoy.name for envoy in envoys],
                    "seconds": time.monotonic() - began}
        finally:
            for process in started:
                process.stop()


def test_interactive_api_experiment_on_openfl_director(openfl_references: References
                                                       ) -> None:
    result = openfl_references.get()
    print(f"OpenFL's director: experiment {result['seconds']:.1f}s, best "
          f"{result['best_accuracy']:.4f}, last {result['last_accuracy']:.4f}")
    # Every round: each collaborator's metric of each task, and the aggregator's weighted
    # average of it; nothing else.
    metrics = [tuple(metric) for metric in result["metrics"]]
    expected = {(origin, task, name) for origin in [*result["envoys"], "aggregator"]
                for task, name in (("train", "train_loss"),
                                   ("aggregated_model_validate", "accuracy"),
                                   ("locally_tuned_model_validate", "accuracy"))}
    assert {(origin, task, name) for _, origin, task, name, _ in metrics} == expected
    for key in expected:
        rounds = sorted(r for r, *rest in metrics if tuple(rest[:3]) == key)
        assert rounds == list(range(5)), (key, rounds)

    initial, best, last = (result[f"{which}_accuracy"] for which in ("initial", "best", "last"))
    assert initial < 0.3
    assert best > 0.7 and best > initial + 0.4
    assert last > 0.7 and last > initial + 0.4
    # The aggregator's validation accuracy rises over the rounds.
    aggregated = {r: v for r, origin, t, m, v in metrics
                  if (origin, t, m) == ("aggregator", "aggregated_model_validate", "accuracy")}
    assert aggregated[4] > aggregated[0] + 0.4
