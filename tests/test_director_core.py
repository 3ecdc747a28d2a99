"""The director core without gRPC: shard acceptance, health windows, scheduling."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedkube.api.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from fedkube.api.experiment import ExperimentStatus
from fedkube.director.core import Director
from fedkube.director.store import MemoryStore, SqliteStore
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
        ExperimentStatus.IN_PROGRESS, ExperimentStatus.IN_PROGRESS, ExperimentStatus.PENDING]
    assert director.queue_position("c") == 1
    assert await director.wait_experiment("env1") == "a"
    director.finish_experiment("a", ExperimentStatus.FINISHED)
    assert director.experiment("c").status is ExperimentStatus.PENDING  # env2 still busy
    director.set_experiment_failed("b", "env3", 1, "boom")
    assert director.experiment("b").status is ExperimentStatus.FAILED
    assert "boom" in director.experiment("b").error
    assert director.experiment("c").status is ExperimentStatus.IN_PROGRESS
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
