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

(several K, `--envoys 8 32`: one table per K.)

`--workload openfl-experiment` compares the directors instead: the same unchanged OpenFL
1.6 interactive-API experiment (tests/openfl_workspace/experiment.py: a numpy MLP on the
8x8 digits, its defaults, ROUNDS rounds) run from the OpenFL virtualenv against OpenFL's
own director (`fx director start`) and against fedkube's (`fedkube director start`), both
with K OpenFL envoys (`fx envoy start`, ofl-env1..K, the digits shard rank i of K), for
each K given, one row per K. Each director gets its own fresh envoys, started only once it
listens, and the experiment is submitted once all K are online at it.

Round time comes from the experiment's metric stream, each metric line of the script
stamped as it arrives. A round's close is its first aggregator metric (the aggregator
sends its averages once every collaborator has reported). The figure is round 0's close
to the last round's close divided by rounds - 1, i.e. the mean time between successive
closes (min-max beside it; the median is in the JSON), so round 0, with the
collaborators' start-up, only serves as the first mark. A mean, not a median: a
collaborator told to sleep wakes in or out of phase with the round's close, so
successive rounds can alternate long and short (2 envoys, OpenFL: 10 s, then 0.01 s).
Beside it, the whole experiment: from "Experiment was submitted" to the last round's
aggregator metric, divided by the rounds (start-up included). The last aggregated-model
accuracy shows both directors trained the same model. A director whose experiment fails
(or stalls: STALL_S without a line of output) is a "failed" cell, with the rounds that
closed, and its log's tail on stderr; `--keep` keeps every process's log.

    python -m benchmarks.round_processes --workload openfl-experiment --envoys 8 32 \
        [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
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
from tests.test_openfl_experiments import (
    WORKSPACE,
    openfl_director,
    openfl_envoys,
    wait_director,
    wait_envoys_online,
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


METRIC_LINE = re.compile(r"\bRound (\d+), (\S+) (\S+) result (\S+):")
SUBMITTED = "Experiment was submitted to the director"


@dataclass
class ExperimentResult:
    director: str
    envoys: int
    rounds: int
    rounds_closed: int  # rounds whose aggregator metrics arrived; < rounds: it failed
    round_s_mean: float | None  # round 0's close to the last closed round's, per round
    round_s_median: float | None  # of the times between successive rounds' close
    round_s_min: float | None
    round_s_max: float | None
    wall_s_per_round: float | None  # submission to the last round's close, / rounds
    envoys_online_s: float | None  # from starting the envoys until all K were online
    last_accuracy: float | None  # the aggregator's aggregated_model_validate, last round
    error: str | None = None  # why it did not finish (its director's log has the rest)


def _log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"(no {path})"
    return f"--- {path} ---\n" + "\n".join(
        path.read_text(errors="replace").splitlines()[-lines:])


STALL_S = 180  # no output for this long: the experiment is stuck, not slow


def _stamped_experiment(python: Path, work: Path, port: int, name: str, rounds: int,
                        timeout: float) -> tuple[list[tuple[float, str]], str | None]:
    """Runs experiment.py, unchanged, in a fresh copy of its workspace; every line of its
    output stamped (time.monotonic()) as it arrives. Killed after timeout s, or after
    STALL_S s without a line. Returns the lines and, if it did not finish, why."""
    workspace = work / f"frontend-{name}"
    shutil.copytree(WORKSPACE, workspace, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DIRECTOR_HOST": "localhost",
           "DIRECTOR_PORT": str(port), "EXPERIMENT_NAME": name, "ROUNDS": str(rounds),
           "COLUMNS": "400"}  # rich, which OpenFL logs through: one line per metric
    lines: list[tuple[float, str]] = []
    process = subprocess.Popen([str(python), "experiment.py"], cwd=workspace, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started, done, killed = time.monotonic(), threading.Event(), []

    def watch() -> None:  # the stream ends when the experiment ends, or when this kills it
        while not done.wait(1.0):
            now = time.monotonic()
            last = lines[-1][0] if lines else started
            if now - started > timeout or now - last > STALL_S:
                killed.append(f"killed after {now - started:.0f} s, {now - last:.0f} s "
                              "without output")
                process.kill()
                return

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
        code = process.wait()
    finally:
        done.set()
        watchdog.join()
    began = lines[0][0] if lines else 0.0
    (workspace / "experiment.log").write_text(  # each line with its arrival, in seconds
        "".join(f"{stamp - began:9.3f} {text}\n" for stamp, text in lines))
    if killed:
        return lines, f"experiment.py {killed[0]}"
    if code != 0 or not any(text.startswith('{"metrics"') for _, text in lines):
        return lines, f"experiment.py exited {code} without its result"
    return lines, None


def _experiment_summary(director: str, envoys: int, rounds: int, online_s: float,
                        lines: list[tuple[float, str]], error: str | None
                        ) -> ExperimentResult:
    """The figures from the stamped lines; of the rounds that closed where it failed."""
    submitted = next((t for t, text in lines if SUBMITTED in text),
                     lines[0][0] if lines else 0.0)
    closed: dict[int, float] = {}
    for stamp, text in lines:
        match = METRIC_LINE.search(text)
        if match and match.group(2) == "aggregator":
            closed.setdefault(int(match.group(1)), stamp)
    seen = sorted(closed)
    if error is None and seen != list(range(rounds)):
        error = f"aggregator metrics for rounds {seen}, expected 0..{rounds - 1}"
    ordered = [closed[r] for r in seen]
    gaps = [b - a for a, b in itertools.pairwise(ordered)]
    accuracy = None
    if error is None:
        parsed = json.loads([text for _, text in lines if text.startswith('{"metrics"')][-1])
        accuracy = round(float(next(
            v for r, origin, task, metric, v in parsed["metrics"]
            if (r, origin, task, metric) == (rounds - 1, "aggregator",
                                             "aggregated_model_validate", "accuracy"))), 4)
    return ExperimentResult(
        director, envoys, rounds, len(seen),
        round((ordered[-1] - ordered[0]) / len(gaps), 3) if gaps else None,
        round(statistics.median(gaps), 3) if gaps else None,
        round(min(gaps), 3) if gaps else None, round(max(gaps), 3) if gaps else None,
        round((ordered[-1] - submitted) / rounds, 3) if error is None else None,
        round(online_s, 1), accuracy, error)


def run_openfl_experiment(director: str, envoys: int, rounds: int, work: Path,
                          python: Path) -> ExperimentResult:
    """The experiment on one director ("OpenFL 1.6" or "fedkube") with envoys OpenFL
    envoys, each process stopped afterwards. A failure comes back in the result's error
    (and the director log's tail on stderr), not raised: the other director still runs."""
    work.mkdir(parents=True)
    port = free_port()
    if director == "fedkube":
        server = director_process(work, port, period=2.0)
        server_log = work / "logs" / "director.log"
    else:
        server = openfl_director(work, port, openfl_python=python)
        server_log = server.log_path
    processes: list[Process] = [server.start()]
    names = [f"ofl-env{rank}" for rank in range(1, envoys + 1)]
    try:
        try:
            wait_director(port)  # an OpenFL envoy that finds no director exits
            began = time.monotonic()
            processes += [envoy.start() for envoy in
                          openfl_envoys(work, port, envoys, openfl_python=python)]
            # 2 cores: K OpenFL processes importing OpenFL take a while.
            wait_envoys_online(python, port, names, timeout=120 + 15 * envoys)
        except (TimeoutError, AssertionError) as exc:
            result = ExperimentResult(director, envoys, rounds, 0, None, None, None, None,
                                      None, None, None, f"before the experiment: {exc}")
        else:
            online_s = time.monotonic() - began
            lines, error = _stamped_experiment(python, work, port, "numpy_digits", rounds,
                                               timeout=300 + 30 * rounds + 2 * envoys)
            result = _experiment_summary(director, envoys, rounds, online_s, lines, error)
        if result.error is not None:
            print(f"{director}, {envoys} envoys: {result.error}; logs under {work}\n"
                  f"{_log_tail(server_log)}", file=sys.stderr)
        return result
    finally:
        for process in processes:
            process.stop()


def _trivial(args: argparse.Namespace, tmp: Path) -> None:
    results: list[Result] = []
    for envoys in args.envoys:
        work = tmp / f"k{envoys}"
        work.mkdir()
        rounds = args.rounds or 10
        pair = [run_fedkube(envoys, rounds, work),
                run_openfl(envoys, rounds, work, args.openfl_python)]
        results += pair
        from rich.table import Table

        view = Table(title=f"Seconds per round, {envoys} envoy processes, trivial task")
        for column in ("workflow", "envoys", "rounds seen", "median s", "min s", "max s"):
            view.add_column(column, justify="left" if column == "workflow" else "right")
        for r in pair:
            view.add_row(r.workflow, str(r.envoys), str(r.rounds), f"{r.round_s_median:.3f}",
                         f"{r.round_s_min:.3f}", f"{r.round_s_max:.3f}")
        console(args.json).print(view)
    if args.json:
        emit("round_processes", [asdict(r) for r in results])


def _per_round(r: ExperimentResult) -> str:
    if r.round_s_mean is None:
        return f"failed ({r.rounds_closed} of {r.rounds} rounds closed)"
    figure = f"{r.round_s_mean:.3f} ({r.round_s_min:.3f}-{r.round_s_max:.3f})"
    if r.error is not None:
        figure += f", then failed ({r.rounds_closed} of {r.rounds} rounds closed)"
    return figure


def _figure(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _openfl_experiment(args: argparse.Namespace, tmp: Path,
                       progress: Callable[[str], None]) -> None:
    rounds = args.rounds or 5
    results: list[ExperimentResult] = []
    for envoys in args.envoys:
        for director, label in (("OpenFL 1.6", "openfl"), ("fedkube", "fedkube")):
            began = time.monotonic()
            result = run_openfl_experiment(director, envoys, rounds,
                                           tmp / f"{label}-k{envoys}", args.openfl_python)
            progress(f"{director}, {envoys} OpenFL envoys: "
                     f"{_figure(result.round_s_mean, 3)} s per round, "
                     f"{result.rounds_closed}/{rounds} rounds, envoys online in "
                     f"{_figure(result.envoys_online_s, 0)} s, "
                     f"{time.monotonic() - began:.0f} s in all"
                     + (f"; FAILED: {result.error}" if result.error else ""))
            results.append(result)
    from rich.table import Table

    view = Table(title=f"Seconds per round, the OpenFL 1.6 digits experiment "
                       f"({rounds} rounds), OpenFL envoys, OpenFL's director vs fedkube's")
    for column in ("envoys", "OpenFL's director s/round (min-max)",
                   "fedkube's director s/round (min-max)", "OpenFL / fedkube",
                   "wall s/round (OpenFL / fedkube)", "last accuracy (OpenFL / fedkube)"):
        view.add_column(column, justify="right")
    for openfl, ours in zip(results[::2], results[1::2], strict=True):
        ratio = "-"
        if openfl.round_s_mean is not None and ours.round_s_mean is not None:
            ratio = f"{openfl.round_s_mean / ours.round_s_mean:.1f}x"
            if openfl.error or ours.error:
                ratio += " (closed rounds)"
        view.add_row(
            str(openfl.envoys), _per_round(openfl), _per_round(ours), ratio,
            f"{_figure(openfl.wall_s_per_round, 2)} / {_figure(ours.wall_s_per_round, 2)}",
            f"{_figure(openfl.last_accuracy, 4)} / {_figure(ours.last_accuracy, 4)}")
    console(args.json, width=170).print(view)
    if args.json:
        emit("round_processes_openfl_experiment", [asdict(r) for r in results],
             rounds=rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("trivial", "openfl-experiment"),
                        default="trivial",
                        help="trivial: fedkube's workflow vs OpenFL's, a trivial task; "
                             "openfl-experiment: the OpenFL digits experiment on OpenFL's "
                             "director vs fedkube's, OpenFL envoys")
    parser.add_argument("--envoys", type=int, nargs="+", default=[8])
    parser.add_argument("--rounds", type=int, default=None,
                        help="10 for trivial, 5 for openfl-experiment")
    parser.add_argument("--openfl-python", type=Path, default=Path(os.environ.get(
        "FEDKUBE_OPENFL_PYTHON", Path.home() / ".cache/fedkube/openfl-1.6-venv/bin/python")))
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory (processes' logs) and say where")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedkube-round-processes-"))
    try:
        if args.workload == "trivial":
            _trivial(args, tmp)
        else:
            _openfl_experiment(args, tmp, console(True).print)
    finally:
        if args.keep:
            console(True).print(f"logs kept under {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
