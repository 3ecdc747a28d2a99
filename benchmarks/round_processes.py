"""Whole rounds with real processes: fedkube's director workflow vs OpenFL 1.6's.

K envoys as separate processes (each runs its collaborator), a trivial task (training
returns the model it got; a 64 x 10 + 10 float32 model), R rounds, same machine, same
run. The figure is the wall time per round once the experiment runs: the median time
between successive rounds' first appearance (fedkube: its status polled every 5 ms;
OpenFL: the first metric of each round on its metric stream).

What a round costs here is the workflow: how results are collected and how a
collaborator waiting for the others learns that the next round is open. fedkube's
collaborators ask again after 100 ms; OpenFL's aggregator tells a waiting collaborator to
sleep 10 s (`Aggregator._get_sleep_time`).

    python -m benchmarks.round_processes --envoys 8 --rounds 10 [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.report import console, emit
from fedkube.api.plan import Plan
from fedkube.client import DirectorClient, experiment_archive
from fedkube.dev.processes import (
    Process,
    director_process,
    envoy_process,
    free_port,
    port_open,
    wait_for,
)

TASK = b'''
import numpy as np

def init_model(params):
    return {"weights": np.zeros((64, 10), np.float32), "bias": np.zeros(10, np.float32)}

def train(model, data, params):
    return model, {}

def validate(model, data, params):
    return {"accuracy": 0.0}
'''

OPENFL_SHARD = '''
from openfl.interface.interactive_api.shard_descriptor import ShardDescriptor


class TinyShard(ShardDescriptor):
    def get_dataset(self, dataset_type="train"):
        return [0]

    @property
    def sample_shape(self):
        return ["8", "8"]

    @property
    def target_shape(self):
        return ["1"]

    @property
    def dataset_description(self):
        return "tiny"
'''

OPENFL_ADAPTER = '''
from openfl.plugins.frameworks_adapters.framework_adapter_interface import (
    FrameworkAdapterPluginInterface)


class NumpyAdapter(FrameworkAdapterPluginInterface):
    """The model is a dict of numpy arrays."""

    @staticmethod
    def get_tensor_dict(model, optimizer=None):
        return dict(model)

    @staticmethod
    def set_tensor_dict(model, tensor_dict, optimizer=None, device="cpu"):
        model.update(tensor_dict)
'''

OPENFL_CLIENT = '''
import json, sys, time
import numpy as np
from openfl.interface.interactive_api.experiment import (
    DataInterface, FLExperiment, ModelInterface, TaskInterface)
from openfl.interface.interactive_api.federation import Federation

port, rounds = int(sys.argv[1]), int(sys.argv[2])
federation = Federation(client_id="bench", director_node_fqdn="localhost",
                        director_port=port, tls=False)


class Loader(DataInterface):
    @property
    def shard_descriptor(self):
        return self._shard_descriptor

    @shard_descriptor.setter
    def shard_descriptor(self, shard_descriptor):
        self._shard_descriptor = shard_descriptor

    def get_train_loader(self, **kwargs):
        return [0]

    def get_valid_loader(self, **kwargs):
        return [0]

    def get_train_data_size(self):
        return 1

    def get_valid_data_size(self):
        return 1


model = {"weights": np.zeros((64, 10), np.float32), "bias": np.zeros(10, np.float32)}
tasks = TaskInterface()


@tasks.register_fl_task(model="model", data_loader="train_loader", device="device",
                        optimizer="optimizer")
def train(model, train_loader, optimizer, device):
    return {"loss": 0.0}


@tasks.register_fl_task(model="model", data_loader="val_loader", device="device")
def validate(model, val_loader, device):
    return {"accuracy": 0.0}


experiment = FLExperiment(federation=federation, experiment_name="rounds")
experiment.start(model_provider=ModelInterface(model=model, optimizer=None,
                                               framework_plugin="numpy_adapter.NumpyAdapter"),
                 task_keeper=tasks, data_loader=Loader(), rounds_to_train=rounds)
first_seen = {}
for metric in federation.dir_client.stream_metrics("rounds"):
    first_seen.setdefault(int(metric["round"]), time.time())
print(json.dumps(first_seen))
'''


@dataclass
class Result:
    workflow: str
    envoys: int
    rounds: int
    round_s_median: float
    round_s_min: float
    round_s_max: float


def _summary(workflow: str, envoys: int, first_seen: dict[int, float]) -> Result:
    ordered = [first_seen[r] for r in sorted(first_seen)]
    gaps = [b - a for a, b in itertools.pairwise(ordered)]
    return Result(workflow, envoys, len(ordered), round(statistics.median(gaps), 3),
                  round(min(gaps), 3), round(max(gaps), 3))


def run_fedkube(envoys: int, rounds: int, work: Path) -> Result:
    port = free_port()
    processes: list[Process] = [director_process(work, port, period=2.0).start()]
    try:
        names = [f"env{i}" for i in range(envoys)]
        processes += [envoy_process(work, name, port, index=i, count=envoys).start()
                      for i, name in enumerate(names)]
        plan = Plan(task="archive:trivial", rounds=rounds, round_timeout_s=600)
        archive, initial = experiment_archive(plan, {"trivial.py": TASK})
        with DirectorClient(f"localhost:{port}", client_id="bench") as client:
            client.wait_online(envoys, timeout=120)
            client.submit("rounds", archive, collaborators=names, initial_model=initial)
            first_seen: dict[int, float] = {}
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                status = client.status("rounds")
                first_seen.setdefault(status.round, time.time())
                if status.status in ("finished", "failed"):
                    break
                time.sleep(0.005)
            assert status.status == "finished", status.error
        # Round 0 starts with the collaborators' process start-up: not a round's cost.
        return _summary("fedkube", envoys, {r: t for r, t in first_seen.items() if r >= 1})
    finally:
        for process in processes:
            process.stop()


def run_openfl(envoys: int, rounds: int, work: Path, python: Path) -> Result:
    fx, port = python.parent / "fx", free_port()
    root = work / "openfl"
    root.mkdir()
    (root / "director_config.yaml").write_text(textwrap.dedent(f"""\
        settings:
          listen_host: 127.0.0.1
          listen_port: {port}
          sample_shape: ['8', '8']
          target_shape: ['1']
          envoy_health_check_period: 2
        """))
    logs: list[subprocess.Popen[bytes]] = []

    def spawn(args: list[str], cwd: Path, log: str) -> None:
        logs.append(subprocess.Popen([str(fx), *args], cwd=cwd, start_new_session=True,
                                     stdout=(root / log).open("wb"), stderr=subprocess.STDOUT))

    try:
        spawn(["director", "start", "--disable-tls", "-c", "director_config.yaml"], root,
              "director.log")
        wait_for(lambda: port_open(port), timeout=60, message="OpenFL director")
        for i in range(envoys):
            envoy_dir = root / f"env{i}"
            envoy_dir.mkdir()
            (envoy_dir / "tiny_shard.py").write_text(OPENFL_SHARD)
            (envoy_dir / "envoy_config.yaml").write_text(
                "params:\n  cuda_devices: []\n  install_requirements: false\n"
                "shard_descriptor:\n  template: tiny_shard.TinyShard\n  params: {}\n")
            spawn(["envoy", "start", "-n", f"env{i}", "--disable-tls", "-ec",
                   "envoy_config.yaml", "-dh", "localhost", "-dp", str(port)], envoy_dir,
                  f"env{i}.log")
        workspace = root / "workspace"  # OpenFL ships the client's working directory
        workspace.mkdir()
        (workspace / "numpy_adapter.py").write_text(OPENFL_ADAPTER)
        (workspace / "client.py").write_text(OPENFL_CLIENT)
        wait_for(lambda: all("Waiting for an experiment" in (root / f"env{i}.log").read_text()
                             for i in range(envoys)), timeout=180, message="OpenFL envoys")
        out = subprocess.run([str(python), "client.py", str(port), str(rounds)],
                             cwd=workspace, capture_output=True, text=True, timeout=1800,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=True)
        first_seen = {int(r): t for r, t in json.loads(out.stdout.splitlines()[-1]).items()}
        return _summary("OpenFL 1.6", envoys, {r: t for r, t in first_seen.items() if r >= 1})
    finally:
        for process in logs:
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for process in logs:
            process.wait(timeout=30)
        shutil.rmtree(root / "workspace", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envoys", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--openfl-python", type=Path, default=Path(os.environ.get(
        "FEDKUBE_OPENFL_PYTHON", Path.home() / ".cache/fedkube/openfl-1.6-venv/bin/python")))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedkube-round-processes-") as tmp:
        results = [run_fedkube(args.envoys, args.rounds, Path(tmp)),
                   run_openfl(args.envoys, args.rounds, Path(tmp), args.openfl_python)]
    from rich.table import Table

    view = Table(title=f"Seconds per round, {args.envoys} envoy processes, trivial task")
    for column in ("workflow", "envoys", "rounds seen", "median s", "min s", "max s"):
        view.add_column(column, justify="left" if column == "workflow" else "right")
    for r in results:
        view.add_row(r.workflow, str(r.envoys), str(r.rounds), f"{r.round_s_median:.3f}",
                     f"{r.round_s_min:.3f}", f"{r.round_s_max:.3f}")
    console(args.json).print(view)
    if args.json:
        emit("round_processes", [asdict(r) for r in results])


if __name__ == "__main__":
    main()
