"""A damaged file fails one experiment, never the director (issue: hardening, defect 1).

The director's data directory as a crash or a full disk leaves it: one experiment's
`last.pb` garbage or cut short, its `archive.zip` gone, its `metrics.jsonl` torn in its
last line. The director must start, serve, fail that experiment with a reason naming the
file, and resume every other one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedkube.api.config import DirectorConfig, TLSSettings
from fedkube.api.experiment import ExperimentState
from fedkube.api.plan import Plan
from fedkube.client.director_client import experiment_archive
from fedkube.dev.processes import wait_for
from fedkube.director.server import DirectorServer
from fedkube.director.store import ExperimentRecord, open_store
from fedkube.proto import director_pb2
from fedkube.transport.tensors import encode_model, model_from_proto
from tests.helpers import eventually

COLLABORATORS = ("env1", "env2")


def in_progress(data_dir: Path, name: str, *, at_round: int = 2) -> Path:
    """An experiment the store says is at round `at_round`, with the files its aggregator
    left: archive, initial model, last.pb, metrics. Returns its directory."""
    directory = data_dir / "experiments" / name
    directory.mkdir(parents=True)
    archive, initial = experiment_archive(Plan(task="digits-logreg", rounds=5))
    (directory / "archive.zip").write_bytes(archive)
    (directory / "initial_model.pb").write_bytes(initial.SerializeToString())
    model = model_from_proto(initial)
    (directory / "last.pb").write_bytes(b"".join(bytes(s) for s in encode_model(model, at_round)))
    (directory / "metrics.jsonl").write_text("".join(
        json.dumps({"origin": "aggregator", "task": "aggregated_validate", "name": "accuracy",
                    "value": 0.5 + r / 10, "round": r}) + "\n" for r in range(at_round)))
    store = open_store(data_dir)
    store.put_experiment(ExperimentRecord(
        name=name, owner="alice", collaborators=COLLABORATORS,
        archive_path=str(directory / "archive.zip"), status=ExperimentState.IN_PROGRESS,
        created_at=1.0, updated_at=2.0, total_rounds=5, current_round=at_round))
    store.close()
    return directory


def damage_garbage(directory: Path) -> str:
    (directory / "last.pb").write_bytes(b"\xff\x00 not a model \x13" * 10)
    return "last.pb"


def damage_truncated(directory: Path) -> str:
    data = (directory / "last.pb").read_bytes()
    (directory / "last.pb").write_bytes(data[: len(data) // 2])
    return "last.pb"


def damage_missing_archive(directory: Path) -> str:
    (directory / "archive.zip").unlink()
    return "archive.zip"


@pytest.mark.parametrize("damage", [damage_garbage, damage_truncated, damage_missing_archive],
                         ids=["garbage-last", "truncated-last", "missing-archive"])
async def test_a_damaged_file_fails_its_experiment_and_the_others_resume(
        tmp_path: Path, damage: object) -> None:
    data_dir = tmp_path / "director"
    damaged = in_progress(data_dir, "damaged")
    in_progress(data_dir, "healthy", at_round=3)
    assert callable(damage)
    filename = damage(damaged)
    server = DirectorServer(DirectorConfig(host="127.0.0.1", port=0, data_dir=data_dir,
                                           tls=TLSSettings(insecure=True)))
    await server.start()
    try:
        record = server.director.experiment("damaged")
        assert record.status is ExperimentState.FAILED
        assert filename in record.error and "cannot resume" in record.error
        assert server.director.experiment("healthy").status is ExperimentState.IN_PROGRESS
        assert server.runner.aggregator("healthy").round == 3
    finally:
        await server.stop(None)
    # What the owner was told is what a restart finds.
    store = open_store(data_dir)
    try:
        assert {r.name: r.status for r in store.experiments()}["damaged"] is (
            ExperimentState.FAILED)
    finally:
        store.close()


async def test_a_torn_last_metrics_line_is_skipped_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "director"
    directory = in_progress(data_dir, "torn", at_round=2)
    with (directory / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"origin": "aggregator", "task": "aggre')  # a full disk's partial write
    server = DirectorServer(DirectorConfig(host="127.0.0.1", port=0, data_dir=data_dir,
                                           tls=TLSSettings(insecure=True)))
    with caplog.at_level(logging.WARNING):
        await server.start()
    try:
        assert server.director.experiment("torn").status is ExperimentState.IN_PROGRESS
        events = server.runner.aggregator("torn").events
        assert [e.round for e in events] == [0, 1]
        assert any("metrics.jsonl" in r.getMessage() for r in caplog.records)
    finally:
        await server.stop(None)


def test_a_damaged_store_is_one_clear_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    """`director start` on a store file that is not SQLite: one line naming the file and
    what to do, exit 1, no traceback (it was a crash loop of tracebacks)."""
    import subprocess
    import sys

    data_dir = tmp_path / "director"
    data_dir.mkdir()
    (data_dir / "director.sqlite3").write_bytes(b"this is not a database" * 100)
    done = subprocess.run(
        [sys.executable, "-m", "fedkube.cli", "director", "start", "--insecure", "--port", "0",
         "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert str(data_dir / "director.sqlite3") in lines[0] and "damaged" in lines[0]
    assert "move it aside" in lines[0]


class FullDisk:
    """The director's store, as SQLite answers on a full disk while `full` is set."""

    def __init__(self, store: Any) -> None:
        self.store, self.full = store, False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)
        if not name.startswith(("put_", "touch_", "delete_")):
            return method

        def write(*args: Any, **kwargs: Any) -> Any:
            if self.full:
                raise sqlite3.OperationalError("database or disk is full")
            return method(*args, **kwargs)
        return write


async def test_a_full_disk_never_splits_what_the_owner_sees_from_the_store(
        tmp_path: Path) -> None:
    """SQLite's "database or disk is full": the director changed memory first, so the owner
    was told "failed" while the store kept "in progress" (revived at a restart, the error
    lost), and SetNewExperiment answered UNKNOWN. Now: store first, RESOURCE_EXHAUSTED
    with a message, and the end of an experiment is written once space returns."""
    from tests.helpers import RunningDirector, running_experiment, stub

    data_dir = tmp_path / "director"
    server = DirectorServer(DirectorConfig(host="127.0.0.1", port=0, data_dir=data_dir,
                                           tls=TLSSettings(insecure=True)))
    await server.start()
    director = server.director
    disk = FullDisk(director.store)
    director.store = disk  # type: ignore[assignment]
    try:
        running = RunningDirector(server)
        await running_experiment(running)
        disk.full = True
        # A new experiment: refused with the reason; nothing of it stays.
        owner = stub(running.address, client_id="alice")
        archive, initial = experiment_archive(Plan(task="digits-logreg", rounds=1))

        async def messages() -> Any:
            yield director_pb2.ExperimentInfo(
                name="second", collaborator_names=["env1"], model_proto=initial,
                experiment_data=director_pb2.ExperimentData(size=len(archive),
                                                            npbytes=archive))

        with pytest.raises(grpc.aio.AioRpcError) as error:
            await owner.SetNewExperiment(messages())
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "disk is full" in (error.value.details() or "")
        assert "second" not in {r.name for r in director.experiment_records()}
        # The running one fails (a collaborator's error) while the disk is full: the owner
        # sees what the store holds.
        director.set_experiment_failed("exp", "env1", 1, "out of memory")
        assert director.experiment("exp").status is ExperimentState.IN_PROGRESS
        assert _stored(data_dir)["exp"] is ExperimentState.IN_PROGRESS
        # Space returns: the end is written by itself, and both agree.
        disk.full = False
        await eventually(lambda: director.experiment("exp").status is ExperimentState.FAILED,
                         within=10, message="the experiment's end written")
        assert _stored(data_dir)["exp"] is ExperimentState.FAILED
        assert "out of memory" in director.experiment("exp").error
        await owner.channel.close()  # type: ignore[attr-defined]
    finally:
        await server.stop(None)


def _stored(data_dir: Path) -> dict[str, ExperimentState]:
    store = open_store(data_dir)
    try:
        return {r.name: r.status for r in store.experiments()}
    finally:
        store.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted for this test (CI runs as root), unmounted after."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "fedkube-test", str(mount)],
                   check=True, capture_output=True, text=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def test_the_director_process_on_a_full_disk_refuses_and_recovers(
        small_disk: Path, tmp_path: Path, processes: list[Any]) -> None:
    """A real director on a disk the test fills: a new experiment is refused with
    RESOURCE_EXHAUSTED and the reason, the director keeps serving, and once space returns
    the same submission is taken."""
    from fedkube.client.director_client import DirectorClient
    from fedkube.dev.processes import director_process, free_port
    from tests.helpers import shard_request, stub

    port = free_port()
    director = director_process(tmp_path, port, period=1.0,
                                extra=["--data-dir", str(small_disk / "director")])
    processes.append(director.start())
    client = DirectorClient(f"localhost:{port}", client_id="alice", timeout=10)
    try:
        import asyncio

        async def register() -> None:
            envoy = stub(f"localhost:{port}", client_id="env1")
            assert (await envoy.UpdateShardInfo(shard_request("env1"))).accepted
            await envoy.channel.close()  # type: ignore[attr-defined]

        wait_for(lambda: _answers(client), timeout=60, message="the director serving")
        asyncio.run(register())
        filler = small_disk / "filler"
        # Every free byte, then ENOSPC (unbuffered: closing it raises nothing more).
        with contextlib.suppress(OSError), filler.open("wb", buffering=0) as sink:
            while True:
                sink.write(b"\0" * (1 << 20))
        archive, initial = experiment_archive(Plan(task="digits-logreg", rounds=1))
        with pytest.raises(grpc.RpcError) as error:
            client.submit("on-a-full-disk", archive, collaborators=["env1"],
                          initial_model=initial)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "full" in (error.value.details() or "")
        assert client.experiments() == []
        assert director.running
        filler.unlink()
        client.submit("on-a-full-disk", archive, collaborators=["env1"], initial_model=initial)
        assert [name for name, *_ in client.experiments()] == ["on-a-full-disk"]
    finally:
        client.close()


def _answers(client: Any) -> bool:
    try:
        client.envoys()
        return True
    except grpc.RpcError:
        return False


def _fill(disk: Path) -> Path:
    """Every free byte of disk in one file, then ENOSPC (unbuffered: closing it raises
    nothing more); returns the file."""
    filler = disk / "filler"
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as sink:
        while True:
            sink.write(b"\0" * (1 << 20))
    return filler


def test_an_experiment_that_ends_on_a_full_disk_is_what_a_restart_finds(
        small_disk: Path, tmp_path: Path, processes: list[Any]) -> None:
    """A real director process: its experiment ends (a collaborator's failure) while the
    disk is full. The owner is told what the store holds, a SIGKILL and a restart on the
    still-full disk find the same, and once space returns the end is written with its
    reason: nothing the owner saw is taken back."""
    import asyncio

    from fedkube.client.director_client import DirectorClient
    from fedkube.dev.processes import director_process, free_port
    from tests.helpers import shard_request, stub

    port = free_port()
    data_dir = small_disk / "director"

    def start() -> Any:
        director = director_process(tmp_path, port, period=1.0,
                                    extra=["--data-dir", str(data_dir)])
        processes.append(director.start())
        wait_for(lambda: _answers(client), timeout=60, message="the director serving")
        return director

    def envoy_call(call: Any) -> None:
        async def run() -> None:
            envoy = stub(f"localhost:{port}", client_id="env1")
            try:
                await call(envoy)
            finally:
                await envoy.channel.close()  # type: ignore[attr-defined]
        asyncio.run(run())

    async def register(envoy: Any) -> None:
        assert (await envoy.UpdateShardInfo(shard_request("env1"))).accepted

    async def fail(envoy: Any) -> None:
        await envoy.SetExperimentFailed(director_pb2.SetExperimentFailedRequest(
            experiment_name="ends-on-a-full-disk", collaborator_name="env1", error_code=1,
            error_description="out of memory"))

    client = DirectorClient(f"localhost:{port}", client_id="alice", timeout=10)
    try:
        director = start()
        envoy_call(register)
        archive, initial = experiment_archive(Plan(task="digits-logreg", rounds=50))
        client.submit("ends-on-a-full-disk", archive, collaborators=["env1"],
                      initial_model=initial)
        assert client.status("ends-on-a-full-disk").status == "in_progress"
        filler = _fill(small_disk)
        envoy_call(fail)
        seen = client.status("ends-on-a-full-disk")
        assert director.running
        assert _stored(data_dir)["ends-on-a-full-disk"].value == seen.status
        director.kill()
        start()  # on the disk still full
        again = client.status("ends-on-a-full-disk")
        assert again.status == seen.status and again.error == seen.error
        filler.unlink()
        if again.status == "in_progress":  # the end was not written: it is, now
            envoy_call(register)
            envoy_call(fail)
        wait_for(lambda: client.status("ends-on-a-full-disk").status == "failed",
                 timeout=30, message="the experiment's end written")
        assert "out of memory" in client.status("ends-on-a-full-disk").error
        assert _stored(data_dir)["ends-on-a-full-disk"] is ExperimentState.FAILED
    finally:
        client.close()
