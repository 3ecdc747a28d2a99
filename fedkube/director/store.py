"""Where the director keeps what must survive a restart.

`DirectorStore` is the interface; `MemoryStore` (tests, throwaway directors) and
`SqliteStore` (the default, one file in the data dir) implement it, and one contract test
suite runs against both. Registrations and health-check timestamps are written in
batches by the director, never once per call, so persistence stays off the hot path.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedkube.api.errors import StoreError
from fedkube.api.experiment import ExperimentState


@dataclass(frozen=True)
class ShardRecord:
    name: str
    shard_info: bytes  # a serialized openfl.director.ShardInfo, kept whole
    registered_at: float
    last_updated: float


@dataclass(frozen=True)
class ExperimentRecord:
    name: str
    owner: str
    collaborators: tuple[str, ...]
    archive_path: str
    status: ExperimentState
    created_at: float
    updated_at: float
    error: str = ""
    current_round: int = 0
    total_rounds: int = 0
    extra: dict[str, str] = field(default_factory=dict)
    # The name its owner gave it, when `name` (the director's key, unique across owners,
    # which envoys and collaborators use) had to differ: names are scoped per owner.
    given_name: str = ""

    @property
    def title(self) -> str:
        """The name its owner knows it by."""
        return self.given_name or self.name

    def evolve(self, **changes: object) -> ExperimentRecord:
        return replace(self, **changes)  # type: ignore[arg-type]


class DirectorStore(ABC):
    @abstractmethod
    def put_shards(self, records: Iterable[ShardRecord]) -> None:
        """Inserts or replaces several shards at once (one transaction)."""

    @abstractmethod
    def touch_shards(self, updates: Iterable[tuple[str, float]]) -> None:
        """Sets last_updated of several shards at once (name, timestamp)."""

    @abstractmethod
    def shards(self) -> list[ShardRecord]: ...

    @abstractmethod
    def delete_shard(self, name: str) -> None: ...

    @abstractmethod
    def put_experiment(self, record: ExperimentRecord) -> None: ...

    @abstractmethod
    def experiments(self) -> list[ExperimentRecord]:
        """All experiments, oldest first."""

    @abstractmethod
    def delete_experiment(self, name: str) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases files and connections."""


class MemoryStore(DirectorStore):
    def __init__(self) -> None:
        self._shards: dict[str, ShardRecord] = {}
        self._experiments: dict[str, ExperimentRecord] = {}

    def put_shards(self, records: Iterable[ShardRecord]) -> None:
        for record in records:
            self._shards[record.name] = record

    def touch_shards(self, updates: Iterable[tuple[str, float]]) -> None:
        for name, stamp in updates:
            if name in self._shards:
                self._shards[name] = replace(self._shards[name], last_updated=stamp)

    def shards(self) -> list[ShardRecord]:
        return list(self._shards.values())

    def delete_shard(self, name: str) -> None:
        self._shards.pop(name, None)

    def put_experiment(self, record: ExperimentRecord) -> None:
        self._experiments[record.name] = record

    def experiments(self) -> list[ExperimentRecord]:
        return sorted(self._experiments.values(), key=lambda e: e.created_at)

    def delete_experiment(self, name: str) -> None:
        self._experiments.pop(name, None)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (
    name TEXT PRIMARY KEY,
    shard_info BLOB NOT NULL,
    registered_at REAL NOT NULL,
    last_updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    collaborators TEXT NOT NULL,
    archive_path TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    current_round INTEGER NOT NULL DEFAULT 0,
    total_rounds INTEGER NOT NULL DEFAULT 0,
    extra TEXT NOT NULL DEFAULT '{}',
    given_name TEXT NOT NULL DEFAULT ''
);
"""
# Columns added since the first schema, with what an older store's rows read as.
_ADDED_COLUMNS = {"experiments": [("given_name", "TEXT NOT NULL DEFAULT ''")]}
_EXPERIMENT_COLUMNS = ("name, owner, collaborators, archive_path, status, created_at, "
                       "updated_at, error, current_round, total_rounds, extra, given_name")


class SqliteStore(DirectorStore):
    """One SQLite file (WAL mode); safe to call from the event loop and from worker threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # A damaged file is found now, with one clear message, not mid-experiment.
            (verdict,) = self._db.execute("PRAGMA quick_check").fetchone()
            if verdict != "ok":
                raise sqlite3.DatabaseError(verdict)
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(
                f"the director's store {path} is damaged ({exc}): restore it from a "
                f"backup, or move it aside to start with an empty store (the experiments' "
                f"files under {path.parent / 'experiments'} are kept)") from exc

    def _migrate(self) -> None:
        """Adds the columns a store written by an earlier version lacks."""
        for table, columns in _ADDED_COLUMNS.items():
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for column, declaration in columns:
                if column not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def _many(self, statement: str, rows: list[tuple[object, ...]]) -> None:
        """statement for every row, in one transaction (rolled back if one fails)."""
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(statement, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def put_shards(self, records: Iterable[ShardRecord]) -> None:
        self._many("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?)",
                   [(r.name, r.shard_info, r.registered_at, r.last_updated) for r in records])

    def touch_shards(self, updates: Iterable[tuple[str, float]]) -> None:
        self._many("UPDATE shards SET last_updated = ? WHERE name = ?",
                   [(stamp, name) for name, stamp in updates])

    def shards(self) -> list[ShardRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM shards ORDER BY registered_at").fetchall()
        return [ShardRecord(*row) for row in rows]

    def delete_shard(self, name: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM shards WHERE name = ?", (name,))

    def put_experiment(self, record: ExperimentRecord) -> None:
        with self._lock:
            self._db.execute(
                f"INSERT OR REPLACE INTO experiments ({_EXPERIMENT_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.name, record.owner, json.dumps(list(record.collaborators)),
                 record.archive_path, record.status.value, record.created_at, record.updated_at,
                 record.error, record.current_round, record.total_rounds,
                 json.dumps(record.extra), record.given_name),
            )

    def experiments(self) -> list[ExperimentRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments "
                                    "ORDER BY created_at").fetchall()
        return [
            ExperimentRecord(
                name=row[0], owner=row[1], collaborators=tuple(json.loads(row[2])),
                archive_path=row[3], status=ExperimentState(row[4]), created_at=row[5],
                updated_at=row[6], error=row[7], current_round=row[8], total_rounds=row[9],
                extra=json.loads(row[10]), given_name=row[11],
            )
            for row in rows
        ]

    def delete_experiment(self, name: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM experiments WHERE name = ?", (name,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


# What a store write may raise: SQLite's "database or disk is full", an I/O error.
WRITE_ERRORS = (sqlite3.Error, OSError)


def open_store(data_dir: Path | None) -> DirectorStore:
    """SQLite under data_dir, or memory when no data dir is given."""
    if data_dir is None:
        return MemoryStore()
    return SqliteStore(data_dir / "director.sqlite3")
