"""The federated learning engine, end to end with real processes, and the aggregator's
checks on results, on a real gRPC server."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedkube.api.plan import Plan
from fedkube.client import DirectorClient, experiment_archive
from fedkube.dev.processes import Process, wait_for
from fedkube.proto import aggregator_pb2, aggregator_pb2_grpc, base_pb2
from fedkube.tasks import digits
from fedkube.tasks.models import BUILTIN_TASKS
from fedkube.transport.channel import open_channel
from fedkube.transport.limits import CHUNK_BYTES
from fedkube.transport.tensors import chunk_message, to_named_tensor
from tests.helpers import (
    RunningDirector,
    bad_results,
    running_experiment,
    start_federation,
    submit,
    task_results,
)

FAILING_TASK = b'''
from fedkube.tasks.models import logreg_init as init_model, logreg_validate as validate

def train(model, data, params):
    raise RuntimeError("this task is broken on purpose")
'''


@pytest.mark.slow
def test_demo_matches_centralized_baseline(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedkube.cli", "demo", "--json", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rounds"] == 20
    assert summary["final_accuracy"] > 0.9
    assert abs(summary["final_accuracy"] - summary["centralized_accuracy"]) <= 0.02
    # The models it wrote reproduce the reported accuracies when loaded: the final one
    # (the last round's model) and the best round's, each on the held-out digits.
    task = BUILTIN_TASKS["digits-logreg"]
    for model, key in (("last_model.npz", "final_accuracy"),
                       ("best_model.npz", "best_round_accuracy")):
        accuracy = task.validate(dict(np.load(tmp_path / model)), digits.test_set(),
                                 {})["accuracy"]
        assert round(accuracy, 4) == summary[key], key
    plot = (tmp_path / "metrics.png").read_bytes()
    assert plot.startswith(b"\x89PNG") and len(plot) > 20_000


@pytest.mark.slow
def test_non_iid_demo_learns_every_digit_from_label_skewed_shards(tmp_path: Path) -> None:
    # Each shard sees only a few of the ten digits...
    for index in range(3):
        _, labels = digits.DigitsShard(index, 3, non_iid=True).get_dataset("train")
        assert len(np.unique(labels)) <= 5
    result = subprocess.run(
        [sys.executable, "-m", "fedkube.cli", "demo", "--non-iid", "--json", "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["non_iid"] is True
    # ...yet the federated model classifies all ten on the held-out set, close to the
    # centralized model (label skew costs FedAvg a few points).
    last = dict(np.load(tmp_path / "last_model.npz"))
    x, y = digits.test_set()
    task = BUILTIN_TASKS["digits-logreg"]
    assert task.validate(last, (x, y), {})["accuracy"] == pytest.approx(
        summary["final_accuracy"], abs=1e-4)
    assert summary["final_accuracy"] > 0.9
    assert summary["centralized_accuracy"] - summary["final_accuracy"] < 0.06
    predicted = np.argmax(x.reshape(len(x), -1) @ last["weights"] + last["bias"], axis=1)
    assert set(predicted.tolist()) == set(range(10))


@pytest.fixture
def federation(tmp_path: Path, processes: list[Process]) -> DirectorClient:
    """A director and four envoys (shards of 4) as real processes."""
    return start_federation(tmp_path, processes, 4)[1]


@pytest.mark.slow
def test_concurrent_experiments_and_queueing(federation: DirectorClient) -> None:
    client = federation
    submit(client, "left", ["env0", "env1"], rounds=4)
    submit(client, "right", ["env2", "env3"], rounds=4)
    submit(client, "later", ["env1", "env2"], rounds=2, task="digits-mlp")
    statuses = {name: client.status(name) for name in ("left", "right", "later")}
    assert statuses["left"].status == statuses["right"].status == "in_progress"
    assert statuses["later"].status == "pending" and statuses["later"].queue_position == 1
    # Both run at once: each makes progress before either finishes.
    wait_for(lambda: client.status("left").round >= 1 and client.status("right").round >= 1,
             timeout=60, message="both experiments past round 1")
    for name in ("left", "right", "later"):
        final = client.wait(name, timeout=120)
        assert final.status == "finished", final
        assert final.round == final.total_rounds
    assert client.status("later").best_metrics["accuracy"] > 0.5
    # Best and last models come back and score what the director reported.
    best, last = client.model("left"), client.model("left", best=False)
    assert set(best) == {"weights", "bias"} and best["weights"].shape == (64, 10)
    task = BUILTIN_TASKS["digits-logreg"]
    shards = [digits.DigitsShard(i, 4).get_dataset("val") for i in (0, 1)]
    val = (np.concatenate([s[0] for s in shards]), np.concatenate([s[1] for s in shards]))
    status = client.status("left")
    assert task.validate(best, val, {})["accuracy"] == pytest.approx(
        status.best_metrics["accuracy"], abs=1e-5)
    assert task.validate(last, val, {})["accuracy"] == pytest.approx(
        status.last_metrics["accuracy"], abs=1e-5)
    aggregated = [m for m in client.metrics("left") if m.task == "aggregated_validate"]
    assert [m.round for m in aggregated] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_failing_collaborator_fails_only_its_experiment(federation: DirectorClient) -> None:
    client = federation
    submit(client, "broken", ["env0", "env1"], files={"broken.py": FAILING_TASK},
           task="archive:broken")
    final = client.wait("broken", timeout=120)
    assert final.status == "failed"
    assert "this task is broken on purpose" in final.error
    submit(client, "after", ["env0", "env1"], rounds=2)
    assert client.wait("after", timeout=120).status == "finished"


async def _send(channel: grpc.aio.Channel, results: aggregator_pb2.TaskResults) -> None:
    aggregator = aggregator_pb2_grpc.AggregatorStub(channel)
    await aggregator.SendLocalTaskResults(chunk_message(results.SerializeToString(),
                                                        CHUNK_BYTES))


async def test_bad_results_are_refused_without_touching_the_model(
        director: RunningDirector) -> None:
    aggregator = await running_experiment(director)
    before = {k: v.copy() for k, v in aggregator.model.items()}
    channel = open_channel(director.address, tls=None, client_id="x")

    cases = bad_results()
    for message, code, text in cases:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _send(channel, message)
        assert error.value.code() == code, (text, error.value.details())
        assert text in (error.value.details() or "")
    # A good result is taken once; sent again (a retry whose reply was lost), it is
    # acknowledged and ignored, whatever it holds.
    await _send(channel, task_results("env1"))
    await _send(channel, task_results("env1"))
    await _send(channel, task_results("env1", tensors=[
        to_named_tensor("weights", np.full((64, 10), 100.0)), to_named_tensor("bias",
                                                                              np.ones(10))]))
    assert aggregator._fedavg.count == 1
    for name, value in before.items():
        np.testing.assert_array_equal(aggregator.model[name], value)
    # Malformed protobuf in the stream.
    aggregator_stub = aggregator_pb2_grpc.AggregatorStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await aggregator_stub.SendLocalTaskResults(
            iter([base_pb2.DataStream(size=5, npbytes=b"\xff\xff\xff\xff\xff")]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await channel.close(None)


def _wheel(name: str, version: str, source: str) -> bytes:
    """A minimal pure-Python wheel, built by hand so the test needs no network."""
    files = {f"{name}/__init__.py": source.encode(),
             f"{name}-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: fedkube-tests\nRoot-Is-Purelib: true\n"
                 b"Tag: py3-none-any\n"}
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip('=')},"
        f"{len(data)}\n" for path, data in files.items())
    record += f"{name}-{version}.dist-info/RECORD,,\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for path, data in {**files, f"{name}-{version}.dist-info/RECORD": record.encode()}.items():
            wheel.writestr(path, data)
    return buffer.getvalue()


TASK_NEEDING_A_PACKAGE = b'''
from fedkube.tasks.models import logreg_init as init_model, logreg_validate as validate
from fedkube.tasks.models import logreg_train

def train(model, data, params):
    import fedkube_extra_dep

    assert fedkube_extra_dep.SCALE == 1.0
    return logreg_train(model, data, params)
'''


@pytest.mark.slow
def test_install_requirements_runs_the_task_in_its_own_virtualenv(
        federation: DirectorClient) -> None:
    client = federation
    wheel_name = "wheels/fedkube_extra_dep-1.0-py3-none-any.whl"
    files = {"needs_dep.py": TASK_NEEDING_A_PACKAGE,
             wheel_name: _wheel("fedkube_extra_dep", "1.0", "SCALE = 1.0\n"),
             "requirements.txt": f"./{wheel_name}\n".encode()}
    plan = Plan(task="archive:needs_dep", rounds=2, params={"learning_rate": 1.0},
                round_timeout_s=60, install_requirements=True)
    archive, initial = experiment_archive(plan, files)
    client.submit("with-deps", archive, collaborators=["env0", "env1"], initial_model=initial)
    # The same archive without the flag cannot import the package.
    plain = plan.model_copy(update={"install_requirements": False})
    archive, initial = experiment_archive(plain, files)
    client.submit("without-deps", archive, collaborators=["env2", "env3"],
                  initial_model=initial)
    assert client.wait("with-deps", timeout=180).status == "finished"
    failed = client.wait("without-deps", timeout=120)
    assert failed.status == "failed"
    assert "No module named 'fedkube_extra_dep'" in failed.error
    # A requirement that cannot be installed fails the experiment with pip's reason.
    broken = {**files, "requirements.txt": b"./wheels/missing-1.0-py3-none-any.whl\n"}
    archive, initial = experiment_archive(plan, broken)
    client.submit("bad-deps", archive, collaborators=["env0"], initial_model=initial)
    failed = client.wait("bad-deps", timeout=120)
    assert failed.status == "failed"
    assert "installing requirements.txt failed" in failed.error
    assert "missing-1.0-py3-none-any.whl" in failed.error
