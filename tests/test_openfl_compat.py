"""Interoperability with the real OpenFL 1.6 (PyPI), run from its own virtualenv."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fedkube.dev.processes import Process, envoy_process, free_port, port_open, wait_for
from tests.helpers import envoys, start

pytestmark = pytest.mark.compat
PERIOD = 2  # OpenFL reads whole seconds of the period

SHARD_DESCRIPTOR = '''
from openfl.interface.interactive_api.shard_descriptor import ShardDescriptor


class DigitsLikeShard(ShardDescriptor):
    """Just enough of a shard for registration: OpenFL needs string shapes."""

    def get_dataset(self, dataset_type="train"):
        return []

    @property
    def sample_shape(self):
        return ["8", "8"]

    @property
    def target_shape(self):
        return ["1"]

    @property
    def dataset_description(self):
        return "an OpenFL envoy's shard"
'''


class OpenFLProcess(Process):
    """An `fx` command of the OpenFL virtualenv, run in its own workspace."""

    def __init__(self, name: str, fx: Path, args: list[str], workspace: Path) -> None:
        super().__init__(name, args, workspace / f"{name}.log", cwd=workspace)
        self.fx = fx

    def command(self) -> list[str]:
        return [str(self.fx), *self.args]


def openfl_client(openfl_python: Path, port: int, call: str) -> Any:
    """Runs OpenFL's own frontend DirectorClient against localhost:port; returns JSON."""
    script = textwrap.dedent(f"""
        import json
        from openfl.transport.grpc.director_client import DirectorClient
        client = DirectorClient(client_id="alice", director_host="localhost",
                                director_port={port}, tls=False, root_certificate=None,
                                private_key=None, certificate=None)
        {call}
    """)
    result = subprocess.run([str(openfl_python), "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


ENVOYS_JSON = ("print(json.dumps({n: e['is_online'] for n, e in "
               "client.get_envoys().items()}))")


def test_openfl_envoy_registers_with_our_director(
        tmp_path: Path, processes: list[Process], openfl_python: Path) -> None:
    from fedkube.dev.processes import director_process

    port = free_port()
    start(processes, director_process(tmp_path, port, period=PERIOD))
    workspace = tmp_path / "openfl-envoy"
    workspace.mkdir()
    (workspace / "digits_like.py").write_text(SHARD_DESCRIPTOR)
    (workspace / "envoy_config.yaml").write_text(
        "params:\n  cuda_devices: []\n"
        "shard_descriptor:\n  template: digits_like.DigitsLikeShard\n  params: {}\n")
    envoy = OpenFLProcess("openfl-envoy", openfl_python.parent / "fx", [
        "envoy", "start", "-n", "ofl-env", "--disable-tls", "-ec", "envoy_config.yaml",
        "-dh", "localhost", "-dp", str(port)], workspace)
    processes.append(envoy.start())
    wait_for(lambda: "ofl-env" in envoys(port) and envoys(port)["ofl-env"].online,
             timeout=90, message="the OpenFL envoy online at our director")
    row = envoys(port)["ofl-env"]
    assert row.description == "an OpenFL envoy's shard"
    assert row.sample_shape == ["8", "8"]
    # It keeps checking in: still online after more than two periods.
    first = row.last_health_check
    wait_for(lambda: envoys(port)["ofl-env"].last_health_check > first + PERIOD,
             timeout=5 * PERIOD, message="later health checks")
    assert envoys(port)["ofl-env"].online and envoy.running


def test_our_envoy_registers_with_openfl_director(
        tmp_path: Path, processes: list[Process], openfl_python: Path) -> None:
    port = free_port()
    workspace = tmp_path / "openfl-director"
    workspace.mkdir()
    (workspace / "director_config.yaml").write_text(
        f"settings:\n  listen_host: localhost\n  listen_port: {port}\n"
        f"  sample_shape: ['8', '8']\n  target_shape: ['1']\n"
        f"  envoy_health_check_period: {PERIOD}\n")
    director = OpenFLProcess("openfl-director", openfl_python.parent / "fx", [
        "director", "start", "--disable-tls", "-c", "director_config.yaml"], workspace)
    processes.append(director.start())
    wait_for(lambda: port_open(port), timeout=90, message="the OpenFL director listening")
    envoy = start(processes, envoy_process(tmp_path, "env1", port, index=0, count=3))
    wait_for(lambda: openfl_client(openfl_python, port, ENVOYS_JSON) == {"env1": True},
             timeout=60, message="our envoy online at the OpenFL director")
    # Its health checks keep arriving: the OpenFL director's last_updated moves on twice
    # while the envoy stays online.
    updated = ("e = client.get_envoys()['env1']; "
               "print(json.dumps([e['last_updated'], e['is_online']]))")
    for _ in range(2):
        seen, is_online = openfl_client(openfl_python, port, updated)
        assert is_online
        wait_for(lambda: openfl_client(openfl_python, port, updated) != [seen, True],  # noqa: B023
                 timeout=3 * PERIOD, interval=0.5, message="a later health check")
    assert openfl_client(openfl_python, port, ENVOYS_JSON) == {"env1": True}
    assert envoy.running and director.running


def test_openfl_frontend_client_reads_our_director(
        tmp_path: Path, processes: list[Process], openfl_python: Path) -> None:
    from fedkube.dev.processes import director_process

    port = free_port()
    start(processes, director_process(tmp_path, port, period=PERIOD))
    start(processes, envoy_process(tmp_path, "env1", port, index=0, count=3))
    start(processes, envoy_process(tmp_path, "env2", port, index=1, count=3))
    wait_for(lambda: {"env1", "env2"} <= set(envoys(port)), timeout=30,
             message="both envoys registered")
    shapes = openfl_client(openfl_python, port,
                           "print(json.dumps(list(map(list, client.get_dataset_info()))))")
    assert shapes == [["8", "8"], ["1"]]
    online = openfl_client(openfl_python, port, ENVOYS_JSON)
    assert online == {"env1": True, "env2": True}
