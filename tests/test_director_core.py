"""The director core without gRPC: shard acceptance, health windows, scheduling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fedkube.api.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from fedkube.api.experiment import TRANSITIONS, ExperimentState, can_move, check_transition
from fedkube.director.core import Director, OwnerLimits
from fedkube.director.store import MemoryStore, SqliteStore
from fedkube.director.upload import ExperimentUploads
from fedkube.proto import director_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def shard(name: str, sample: tuple[str, ...] = ("8", "8")) -> director_pb2.ShardInfo:
    return director_pb2.ShardInfo(node_info=director_pb2.NodeInfo(name=name),
                                  shard_description="d", n_samples=10,
                                  sample_shape=sample, target_shape=["1"])


def make(tmp_path: Path, clock: Clock, store: SqliteStore | None = None) -> Director:
    return Director(store=store or MemoryStore(), data_dir=tmp_path, sample_shape=["8", "8"],
                    target_shape=["1"], health_check_period=10, clock=clock)


def test_shape_mismatch_is_refused_with_reason(tmp_path: Path) -> None:
    director = make(tmp_path, Clock())
    ack = director.acknowledge_shard(shard("env1", ("28", "28")))
    assert not ack.accepted
    assert "['28', '28']" in ack.reason and "['8', '8']" in ack.reason
    assert director.get_envoys() == []


def test_online_for_twice_the_period(tmp_path: Path) -> None:
    clock = Clock()
    director = make(tmp_path, clock)
    assert director.acknowledge_shard(shard("env1")).accepted
    (state,) = director.get_envoys()
    clock.now += 19.9
    assert director.is_online(state)
    clock.now += 0.2
    assert not director.is_online(state)
    assert director.update_envoy_status("env1", is_experiment_running=False,
                                        cuda_devices=[]) == 10
    assert director.is_online(state)


def test_health_check_from_unknown_envoy(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="unknown shard 'ghost'"):
        make(tmp_path, Clock()).update_envoy_status("ghost", is_experiment_running=False,
                                                    cuda_devices=[])


def test_health_updates_cuda_devices(tmp_path: Path) -> None:
    director = make(tmp_path, Clock())
    director.acknowledge_shard(shard("env1"))
    gpu = director_pb2.CudaDeviceInfo(index=0, name="H100", memory_total=80)
    director.update_envoy_status("env1", is_experiment_running=True, cuda_devices=[gpu])
    (state,) = director.get_envoys()
    assert list(state.shard_info.node_info.cuda_devices) == [gpu]
    assert state.is_experiment_running


def test_restart_restores_shards_and_flushed_health(tmp_path: Path) -> None:
    clock = Clock()
    director = make(tmp_path, clock, SqliteStore(tmp_path / "s.db"))
    director.acknowledge_shard(shard("env1"))
    # Written behind, with the health timestamps: not on the store until a flush.
    assert SqliteStore(tmp_path / "s.db").shards() == []
    clock.now += 5
    director.update_envoy_status("env1", is_experiment_running=False, cuda_devices=[])
    assert director.flush() == 1
    assert director.flush() == 0
    director.close()
    again = make(tmp_path, clock, SqliteStore(tmp_path / "s.db"))
    (state,) = again.get_envoys()
    assert state.name == "env1" and state.last_updated == clock.now


async def test_scheduling_queues_experiments_on_busy_shards(tmp_path: Path) -> None:
    director = make(tmp_path, Clock())
    for name in ("env1", "env2", "env3"):
        director.acknowledge_shard(shard(name))
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"zip")
    a = director.set_new_experiment(name="a", owner="alice", collaborators=["env1"],
                                    archive_path=archive)
    b = director.set_new_experiment(name="b", owner="alice", collaborators=["env2", "env3"],
                                    archive_path=archive)
    c = director.set_new_experiment(name="c", owner="bob", collaborators=["env1", "env2"],
                                    archive_path=archive)
    assert [director.experiment(x.name).status for x in (a, b, c)] == [
        ExperimentState.IN_PROGRESS, ExperimentState.IN_PROGRESS, ExperimentState.PENDING]
    assert director.queue_position("c") == 1
    assert await director.wait_experiment("env1") == "a"
    director.finish_experiment("a", ExperimentState.FINISHED)
    assert director.experiment("c").status is ExperimentState.PENDING  # env2 still busy
    director.set_experiment_failed("b", "env3", 1, "boom")
    assert director.experiment("b").status is ExperimentState.FAILED
    assert "boom" in director.experiment("b").error
    assert director.experiment("c").status is ExperimentState.IN_PROGRESS
    assert await director.wait_experiment("env2") == "c"


def test_experiment_validation(tmp_path: Path) -> None:
    director = make(tmp_path, Clock())
    director.acknowledge_shard(shard("env1"))
    archive = tmp_path / "a.zip"
    with pytest.raises(InvalidArgumentError, match="name"):
        director.set_new_experiment(name="Bad Name", owner="o", collaborators=["env1"],
                                    archive_path=archive)
    with pytest.raises(InvalidArgumentError, match="unknown collaborators"):
        director.set_new_experiment(name="x", owner="o", collaborators=["nope"],
                                    archive_path=archive)
    director.set_new_experiment(name="x", owner="o", collaborators=["env1"],
                                archive_path=archive)
    with pytest.raises(AlreadyExistsError):
        director.set_new_experiment(name="x", owner="o", collaborators=["env1"],
                                    archive_path=archive)
    with pytest.raises(PermissionDeniedError):
        director.get_experiment_data("x", "env2")
    with pytest.raises(NotFoundError):  # another owner's experiment is invisible
        director.get_experiment_status("mallory", "x")


def test_final_statuses_have_no_way_out() -> None:
    assert set(TRANSITIONS) == set(ExperimentState)
    for state in ExperimentState:
        assert state.is_final == (TRANSITIONS[state] == frozenset()), state
        for target in ExperimentState:
            if state.is_final:
                assert not can_move(state, target)
                with pytest.raises(FailedPreconditionError, match="it is final"):
                    check_transition(state, target)
    assert can_move(ExperimentState.PENDING, ExperimentState.IN_PROGRESS)
    assert not can_move(ExperimentState.IN_PROGRESS, ExperimentState.PENDING)


def test_a_forbidden_status_change_is_refused(tmp_path: Path) -> None:
    director = make(tmp_path, Clock())
    director.acknowledge_shard(shard("env1"))
    director.acknowledge_shard(shard("env2"))
    archive = tmp_path / "a.zip"
    director.set_new_experiment(name="a", owner="o", collaborators=["env1"],
                                archive_path=archive)
    director.set_new_experiment(name="b", owner="o", collaborators=["env1", "env2"],
                                archive_path=archive)
    assert director.experiment("b").status is ExperimentState.PENDING
    with pytest.raises(FailedPreconditionError, match="pending and cannot become finished"):
        director.finish_experiment("b", ExperimentState.FINISHED)  # it never ran
    director.finish_experiment("a", ExperimentState.FINISHED)
    director.finish_experiment("a", ExperimentState.FAILED, "late")  # ended: ignored
    assert director.experiment("a").status is ExperimentState.FINISHED
    assert director.experiment("a").error == ""
    with pytest.raises(FailedPreconditionError,
                       match="'a' is finished and cannot become in_progress"):
        director.move("a", ExperimentState.IN_PROGRESS)
    with pytest.raises(InternalError, match="through move"):
        director.update_experiment("a", status=ExperimentState.IN_PROGRESS)
    assert director.experiment("a").status is ExperimentState.FINISHED
    assert director.experiment("b").status is ExperimentState.IN_PROGRESS  # env1 freed


async def test_a_refused_upload_leaves_the_running_one_its_name(tmp_path: Path) -> None:
    director = make(tmp_path, Clock())
    director.acknowledge_shard(shard("env1"))
    uploads = ExperimentUploads(director)
    chunk = director_pb2.ExperimentInfo(
        name="x", collaborator_names=["env1"],
        experiment_data=director_pb2.ExperimentData(size=3, npbytes=b"zip"))
    more = asyncio.Event()

    async def slow() -> AsyncIterator[director_pb2.ExperimentInfo]:
        yield chunk
        await more.wait()
        yield chunk

    async def once() -> AsyncIterator[director_pb2.ExperimentInfo]:
        yield chunk

    first = asyncio.create_task(uploads.receive("o", slow()))
    await asyncio.sleep(0)  # its first chunk is in
    for _ in range(2):  # the second refusal too: the first did not free the name
        with pytest.raises(AlreadyExistsError, match="'x' is uploading"):
            await uploads.receive("o", once())
    # Another owner's `x` is its own: neither refused nor in the way.
    other = await uploads.receive("p", once())
    assert other.title == "x" and other.name != "x"
    assert (director.experiment_dir("x") / "archive.zip.part").exists()
    more.set()
    record = await first
    assert record.status is ExperimentState.PENDING  # p's `x` holds env1
    assert (director.experiment_dir("x") / "archive.zip").read_bytes() == b"zipzip"
    with pytest.raises(AlreadyExistsError):
        await uploads.receive("o", once())
    assert (director.experiment_dir("x") / "archive.zip").exists()  # kept


def _queue(director: Director, tmp_path: Path, owner: str, name: str,
           shards: list[str]) -> str:
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"zip")
    return director.set_new_experiment(name=name, owner=owner, collaborators=shards,
                                       archive_path=archive).name


def test_one_owners_queue_never_starves_another(tmp_path: Path) -> None:
    """Oldest first put bob's one experiment behind alice's thousand; in turn by owner,
    bob's is next as soon as alice's running one ends."""
    director = make(tmp_path, Clock())
    director.acknowledge_shard(shard("env1"))
    for i in range(30):
        _queue(director, tmp_path, "alice", f"a{i}", ["env1"])
    _queue(director, tmp_path, "bob", "b0", ["env1"])
    _queue(director, tmp_path, "carol", "c0", ["env1"])
    assert director.experiment("a0").status is ExperimentState.IN_PROGRESS
    assert director.queue_position("b0") == 1  # alice's running a0 was her turn
    assert director.queue_position("c0") == 2
    assert director.queue_position("a1") == 3
    director.finish_experiment("a0", ExperimentState.FINISHED)
    assert director.experiment("b0").status is ExperimentState.IN_PROGRESS
    director.finish_experiment("b0", ExperimentState.FINISHED)
    assert director.experiment("c0").status is ExperimentState.IN_PROGRESS
    director.finish_experiment("c0", ExperimentState.FINISHED)
    assert director.experiment("a1").status is ExperimentState.IN_PROGRESS


def test_owners_are_limited_in_queued_experiments_and_stored_bytes(tmp_path: Path) -> None:
    director = Director(store=MemoryStore(), data_dir=tmp_path, sample_shape=["8", "8"],
                        target_shape=["1"], health_check_period=10, clock=Clock(),
                        limits=OwnerLimits(max_queued=2, max_stored_bytes=1000))
    director.acknowledge_shard(shard("env1"))
    for name in ("run", "q1", "q2"):  # one running, two queued
        _queue(director, tmp_path, "alice", name, ["env1"])
    with pytest.raises(ResourceExhaustedError, match=r"2 experiments queued.*"
                       r"--max-queued-per-owner 2"):
        _queue(director, tmp_path, "alice", "q3", ["env1"])
    _queue(director, tmp_path, "bob", "b1", ["env1"])  # another owner is not held back
    # Stored bytes: what the owner's experiments hold under the data dir.
    (director.experiment_dir("b1")).mkdir(parents=True, exist_ok=True)
    (director.experiment_dir("b1") / "best.pb").write_bytes(b"x" * 1000)
    assert director.stored_bytes("bob") == 1000 and director.upload_budget("bob") == 0
    with pytest.raises(ResourceExhaustedError, match=r"1000 bytes.*"
                       r"--max-stored-bytes-per-owner 1000"):
        _queue(director, tmp_path, "bob", "b2", ["env1"])
    director.remove_experiment_data("bob", "b1")
    assert director.upload_budget("bob") == 1000
    _queue(director, tmp_path, "bob", "b2", ["env1"])


def test_names_are_scoped_per_owner(tmp_path: Path) -> None:
    """A name another owner holds is neither refused nor revealed: each owner has its own
    `mnist`, under a key of the director's that envoys see."""
    clock = Clock()
    director = make(tmp_path, clock, SqliteStore(tmp_path / "s.db"))
    director.acknowledge_shard(shard("env1"))
    alices = _queue(director, tmp_path, "owner:alice", "mnist", ["env1"])
    bobs = _queue(director, tmp_path, "owner:bob", "mnist", ["env1"])
    assert alices == "mnist" and bobs != "mnist" and bobs.startswith("mnist-")
    with pytest.raises(AlreadyExistsError, match="you already have"):
        _queue(director, tmp_path, "owner:bob", "mnist", ["env1"])
    assert director.get_experiment_status("owner:bob", "mnist").name == bobs
    assert director.get_experiment_status("owner:alice", "mnist").name == alices
    # An admin finds each by the director's key and sees the keys.
    assert director.get_experiment_status("admin:root", bobs, admin=True).owner == "owner:bob"
    assert {director.shown_name(r, "admin:root", True)
            for r in director.get_experiments_list("admin:root", True)} == {alices, bobs}
    with pytest.raises(NotFoundError):
        director.get_experiment_status("owner:alice", bobs)
    director.close()
    again = make(tmp_path, clock, SqliteStore(tmp_path / "s.db"))  # a restart keeps both
    assert again.get_experiment_status("owner:bob", "mnist").name == bobs
    again.remove_experiment_data("owner:bob", "mnist")
    assert again.get_experiment_status("owner:alice", "mnist").name == alices
    _queue(again, tmp_path, "owner:bob", "mnist", ["env1"])  # the name is bob's to reuse


def test_an_owner_at_its_running_limit_waits_while_others_run(tmp_path: Path) -> None:
    director = Director(store=MemoryStore(), data_dir=tmp_path, sample_shape=["8", "8"],
                        target_shape=["1"], health_check_period=10, clock=Clock(),
                        limits=OwnerLimits(max_running=1))
    for name in ("env1", "env2", "env3"):
        director.acknowledge_shard(shard(name))
    _queue(director, tmp_path, "alice", "a1", ["env1"])
    _queue(director, tmp_path, "alice", "a2", ["env2"])  # a free shard, but alice's turn is up
    _queue(director, tmp_path, "bob", "b1", ["env3"])
    states = {n: director.experiment(n).status for n in ("a1", "a2", "b1")}
    assert states == {"a1": ExperimentState.IN_PROGRESS, "a2": ExperimentState.PENDING,
                      "b1": ExperimentState.IN_PROGRESS}
    director.finish_experiment("a1", ExperimentState.FINISHED)
    assert director.experiment("a2").status is ExperimentState.IN_PROGRESS
