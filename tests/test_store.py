"""One contract suite for every DirectorStore backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedkube.api.experiment import ExperimentState
from fedkube.director.store import (
    DirectorStore,
    ExperimentRecord,
    MemoryStore,
    ShardRecord,
    SqliteStore,
)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> DirectorStore:
    if request.param == "memory":
        return MemoryStore()
    return SqliteStore(tmp_path / "store.sqlite3")


def _experiment(name: str, created: float) -> ExperimentRecord:
    return ExperimentRecord(name=name, owner="alice", collaborators=("env1", "env2"),
                            archive_path=f"/x/{name}.zip", status=ExperimentState.PENDING,
                            created_at=created, updated_at=created, extra={"k": "v"})


def test_shards_round_trip(store: DirectorStore) -> None:
    store.put_shards([ShardRecord("env1", b"\x01\x02", 1.0, 2.0),
                      ShardRecord("env2", b"\x03", 1.5, 2.5)])
    assert store.shards() == [ShardRecord("env1", b"\x01\x02", 1.0, 2.0),
                              ShardRecord("env2", b"\x03", 1.5, 2.5)]
    store.put_shards([ShardRecord("env1", b"\x09", 1.0, 3.0)])
    assert store.shards()[0] == ShardRecord("env1", b"\x09", 1.0, 3.0)


def test_touch_shards_updates_only_known_shards(store: DirectorStore) -> None:
    store.put_shards([ShardRecord("env1", b"", 1.0, 2.0)])
    store.touch_shards([("env1", 10.0), ("ghost", 11.0)])
    assert [(s.name, s.last_updated) for s in store.shards()] == [("env1", 10.0)]
    store.delete_shard("env1")
    assert store.shards() == []


def test_experiments_round_trip_oldest_first(store: DirectorStore) -> None:
    store.put_experiment(_experiment("b", 2.0))
    store.put_experiment(_experiment("a", 1.0))
    assert [e.name for e in store.experiments()] == ["a", "b"]
    done = _experiment("a", 1.0).evolve(status=ExperimentState.FAILED, error="boom",
                                         current_round=3, total_rounds=5)
    store.put_experiment(done)
    assert store.experiments()[0] == done
    store.delete_experiment("a")
    assert [e.name for e in store.experiments()] == ["b"]


def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "s.sqlite3")
    first.put_shards([ShardRecord("env1", b"abc", 1.0, 2.0)])
    first.put_experiment(_experiment("e", 1.0))
    first.close()
    second = SqliteStore(tmp_path / "s.sqlite3")
    assert second.shards() == [ShardRecord("env1", b"abc", 1.0, 2.0)]
    assert second.experiments() == [_experiment("e", 1.0)]
