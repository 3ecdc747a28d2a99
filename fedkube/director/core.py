"""The director's core: a state machine with the methods of OpenFL 1.6's `Director`.

No gRPC here: the servicer translates messages and errors. Durable state goes through a
`DirectorStore`; envoy health lives in memory and is flushed to the store in batches.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedkube.api.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from fedkube.api.experiment import ExperimentState, check_transition
from fedkube.api.policy import ShardPolicy
from fedkube.api.review import DECISIONS, REVIEW_EXTRA, encoded_reviews, reviews_of
from fedkube.director.store import WRITE_ERRORS, DirectorStore, ExperimentRecord, ShardRecord
from fedkube.proto import director_pb2

log = logging.getLogger(__name__)

# Extra fields a round's summary does not replace.
_KEPT_EXTRA = frozenset({REVIEW_EXTRA})

# Matched whole (fullmatch): with `match`, `$` also matches before a trailing newline.
EXPERIMENT_NAME = re.compile(r"[a-z0-9]([a-z0-9._-]{0,251}[a-z0-9])?")
SHARD_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")


@dataclass
class EnvoyState:
    """What the director knows of one registered shard and its envoy."""

    name: str
    shard_info: director_pb2.ShardInfo
    registered_at: float
    last_updated: float
    is_experiment_running: bool = False
    current_experiment: str | None = None


@dataclass(frozen=True)
class OwnerLimits:
    """What one owner may hold at once, so that no owner crowds out the others (each
    refused past its limit with RESOURCE_EXHAUSTED naming it); 0 is no limit."""

    max_queued: int = 100  # experiments waiting for their shards
    max_running: int = 0  # experiments running at once (the others wait their turn)
    max_stored_bytes: int = 100 << 30  # archives, models and metrics on the director's disk


@dataclass(frozen=True)
class Claim:
    """A new experiment's key, held while it uploads, and the bytes its owner may still
    store (None: owners are not limited)."""

    key: str
    budget: int | None


@dataclass(frozen=True)
class Acknowledgement:
    accepted: bool
    reason: str = ""


class ExperimentRunner(Protocol):
    """Runs an experiment once its collaborators are dispatched (the aggregator's side)."""

    def inspect(self, archive: Path, name: str) -> int:
        """Validates experiment name's uploaded archive (raising ServiceError), preparing
        it for its collaborators; returns its rounds."""

    def start(self, experiment: ExperimentRecord) -> None: ...

    def stop(self, name: str) -> None: ...

    def reviewed(self, name: str, shard: str, decision: str, reason: str) -> None:
        """A shard decided on experiment name (see Director.decide)."""


class Director:
    def __init__(
        self,
        *,
        store: DirectorStore,
        data_dir: Path,
        sample_shape: Sequence[str],
        target_shape: Sequence[str],
        health_check_period: float,
        clock: Callable[[], float] = time.time,
        limits: OwnerLimits | None = None,
    ) -> None:
        self.store = store
        self.data_dir = data_dir
        self.sample_shape = list(sample_shape)
        self.target_shape = list(target_shape)
        self.health_check_period = health_check_period
        self.clock = clock
        self.limits = limits or OwnerLimits()
        # The federation's policy on new experiments (the shape of a shard's), if any.
        self.policy: ShardPolicy | None = None
        self.runner: ExperimentRunner | None = None
        self._envoys: dict[str, EnvoyState] = {}
        self._dirty_health: set[str] = set()
        self._unsaved_shards: dict[str, ShardRecord] = {}
        # Experiments' ends a full store refused: name -> (status, error), retried.
        self._unwritten_ends: dict[str, tuple[ExperimentState, str]] = {}
        self._experiments: dict[str, ExperimentRecord] = {}
        # (owner, the name it gave) -> key, and the keys of uploads under way with theirs.
        self._by_owner: dict[tuple[str, str], str] = {}
        self._claimed: dict[str, tuple[str, str]] = {}
        # When each owner's experiment last started (a count), for turns in in_turn().
        self._served: dict[str, int] = {}
        self._starts = itertools.count(1)
        # Set and replaced whenever dispatch changes; WaitExperiment calls re-check on it.
        self._dispatch_changed = asyncio.Event()
        self._load()

    # -- persistence -----------------------------------------------------------------

    def _load(self) -> None:
        for record in self.store.shards():
            info = director_pb2.ShardInfo.FromString(record.shard_info)
            self._envoys[record.name] = EnvoyState(
                name=record.name, shard_info=info, registered_at=record.registered_at,
                last_updated=record.last_updated,
            )
        for experiment in self.store.experiments():
            self._experiments[experiment.name] = experiment
            self._by_owner[experiment.owner, experiment.title] = experiment.name
            if experiment.status is ExperimentState.IN_PROGRESS:
                self._assign(experiment)
        if self._envoys or self._experiments:
            log.info("restored %d shards and %d experiments from the store",
                     len(self._envoys), len(self._experiments))

    def resumable(self) -> list[ExperimentRecord]:
        """Experiments that were running when the director stopped."""
        return [e for e in self._experiments.values() if e.status is ExperimentState.IN_PROGRESS]

    def ran_and_ended(self) -> list[ExperimentRecord]:
        """Experiments that ran and have ended (finished or failed), as the store has them."""
        return [e for e in self._experiments.values()
                if e.status in (ExperimentState.FINISHED, ExperimentState.FAILED)]

    def flush(self) -> int:
        """Writes the registrations and health timestamps since the last flush, each kind
        in one transaction; returns how many shards it wrote. Safe in a worker thread:
        it takes the pending records with one swap each and serializes nothing."""
        shards, self._unsaved_shards = self._unsaved_shards, {}
        dirty, self._dirty_health = self._dirty_health, set()
        self.store.put_shards(shards.values())
        updates = [(name, state.last_updated) for name in dirty
                   if (state := self._envoys.get(name)) is not None]
        self.store.touch_shards(updates)
        return len(shards.keys() | dirty)

    # -- shards and envoys ------------------------------------------------------------

    def acknowledge_shard(self, shard_info: director_pb2.ShardInfo) -> Acknowledgement:
        name = shard_info.node_info.name
        if not name:
            return Acknowledgement(False, "the shard has no node_info.name")
        if not SHARD_NAME.fullmatch(name):
            return Acknowledgement(False, f"shard name {name!r} must be 1-253 letters, "
                                          "digits, '.', '-' or '_', starting and ending with "
                                          "a letter or digit")
        sample, target = list(shard_info.sample_shape), list(shard_info.target_shape)
        if sample != self.sample_shape or target != self.target_shape:
            reason = (f"shard {name} has sample shape {sample} and target shape {target}; "
                      f"this federation needs {self.sample_shape} and {self.target_shape}")
            log.warning("refused shard: %s", reason)
            return Acknowledgement(False, reason)
        now = self.clock()
        previous = self._envoys.get(name)
        state = EnvoyState(
            name=name, shard_info=shard_info,
            registered_at=previous.registered_at if previous else now, last_updated=now,
            current_experiment=previous.current_experiment if previous else None,
        )
        self._envoys[name] = state
        # Written by flush() with the health timestamps, off the call's path (it was a
        # tenth of the director's CPU per registration). A registration that a crash
        # loses before the flush costs nothing: the envoy's next health check is told
        # NOT_FOUND and it registers again.
        self._unsaved_shards[name] = ShardRecord(name, shard_info.SerializeToString(),
                                                 state.registered_at, now)
        log.info("accepted shard %s (%d samples)", name, shard_info.n_samples)
        return Acknowledgement(True)

    def update_envoy_status(
        self, name: str, *, is_experiment_running: bool,
        cuda_devices: Sequence[director_pb2.CudaDeviceInfo], age_s: float = 0.0,
    ) -> float:
        """Records a health check (answered `age_s` ago, by a frontend); returns the period
        the envoy should check in at."""
        state = self._envoys.get(name)
        if state is None:
            raise NotFoundError(f"unknown shard {name!r}: register it (UpdateShardInfo) first")
        state.last_updated = self.clock() - age_s
        state.is_experiment_running = is_experiment_running
        devices = state.shard_info.node_info.cuda_devices
        if list(devices) != list(cuda_devices):
            del devices[:]
            devices.extend(cuda_devices)
        self._dirty_health.add(name)
        return self.health_check_period

    def is_online(self, state: EnvoyState) -> bool:
        return self.clock() - state.last_updated < 2 * self.health_check_period

    def registered_samples(self, name: str) -> int | None:
        """The samples shard name registered, if it is registered."""
        state = self._envoys.get(name)
        return state.shard_info.n_samples if state is not None else None

    def get_envoys(self) -> list[EnvoyState]:
        return list(self._envoys.values())

    def get_registered_shards(self) -> list[director_pb2.ShardInfo]:
        return [state.shard_info for state in self._envoys.values()]

    def get_dataset_info(self) -> tuple[list[str], list[str]]:
        return self.sample_shape, self.target_shape

    # -- experiments ------------------------------------------------------------------

    def experiment_records(self) -> list[ExperimentRecord]:
        return list(self._experiments.values())

    def experiment(self, name: str) -> ExperimentRecord:
        experiment = self._experiments.get(name)
        if experiment is None:
            raise NotFoundError(f"no experiment named {name!r}")
        return experiment

    def _owned(self, caller: str, name: str, admin: bool = False) -> ExperimentRecord:
        """The caller's experiment of that name; an admin's names are the director's keys
        (its own experiments also answer to the names it gave them)."""
        key = name if admin and name in self._experiments else self._by_owner.get((caller, name))
        if key is None:
            # Same answer as a missing experiment: do not reveal other owners' names.
            raise NotFoundError(f"no experiment named {name!r}")
        return self._experiments[key]

    @staticmethod
    def shown_name(record: ExperimentRecord, caller: str, admin: bool = False) -> str:
        """The name a caller knows an experiment by: an owner the name it gave, an admin
        (who may see several owners' `mnist`) the director's key."""
        return record.name if admin else record.title

    def experiment_dir(self, name: str) -> Path:
        return self.data_dir / "experiments" / name

    def validate_new_experiment(self, name: str, collaborators: Sequence[str],
                                owner: str = "") -> int | None:
        """Refuses what may not be submitted; returns the bytes the owner's experiment may
        still store (upload_budget), or None when owners are not limited."""
        if not EXPERIMENT_NAME.fullmatch(name):
            raise InvalidArgumentError(
                f"experiment name {name!r} must be 1-253 lowercase letters, digits, '.', '-' "
                "or '_', starting and ending with a letter or digit")
        # Names are scoped per owner: another owner's `mnist` is neither refused nor told.
        if (owner, name) in self._by_owner:
            raise AlreadyExistsError(f"you already have an experiment named {name!r}")
        if (owner, name) in self._claimed.values():
            raise AlreadyExistsError(f"your experiment {name!r} is uploading")
        if not collaborators:
            raise InvalidArgumentError("an experiment needs at least one collaborator")
        if len(set(collaborators)) != len(collaborators):
            raise InvalidArgumentError("collaborator names repeat")
        unknown = sorted(set(collaborators) - set(self._envoys))
        if unknown:
            raise InvalidArgumentError(f"unknown collaborators (no such shard): {unknown}")
        return self._check_limits(owner)

    def _check_limits(self, owner: str) -> int | None:
        """The owner's limits; returns its upload budget (one walk of its directories)."""
        limits = self.limits
        queued = sum(1 for e in self._experiments.values()
                     if e.owner == owner and e.status is ExperimentState.PENDING)
        if limits.max_queued and queued >= limits.max_queued:
            raise ResourceExhaustedError(
                f"you have {queued} experiments queued, the most this director takes from "
                f"one owner (--max-queued-per-owner {limits.max_queued}); wait for some to "
                "start, or remove some")
        budget = self.upload_budget(owner)
        if budget == 0:
            raise ResourceExhaustedError(
                f"your experiments hold {self.stored_bytes(owner)} bytes on the director, "
                f"its limit per owner (--max-stored-bytes-per-owner "
                f"{limits.max_stored_bytes}); remove some (fedkube experiment remove)")
        return budget

    def stored_bytes(self, owner: str) -> int:
        """What an owner's experiments hold on the director's disk."""
        return sum(_tree_bytes(self.experiment_dir(e.name))
                   for e in self._experiments.values() if e.owner == owner)

    def upload_budget(self, owner: str) -> int | None:
        """The bytes an owner's next upload may add, or None when owners are not limited."""
        if not self.limits.max_stored_bytes:
            return None
        return max(0, self.limits.max_stored_bytes - self.stored_bytes(owner))

    def claim_name(self, owner: str, name: str, collaborators: Sequence[str]) -> Claim:
        """Checks a new experiment and holds a key for it until release_name (an upload
        under way); returns the key (its name, or, when another owner's experiment has
        that key, the name with a digest of owner and name) and the owner's budget."""
        budget = self.validate_new_experiment(name, collaborators, owner)
        taken = self._experiments.keys() | self._claimed.keys()
        key = name
        digest = hashlib.sha256(f"{owner}\0{name}".encode()).hexdigest()
        attempt = 0
        while key in taken:
            suffix = digest[:10] + (f"-{attempt}" if attempt else "")
            key = f"{name[:252 - len(suffix)].rstrip('._-')}-{suffix}"
            attempt += 1
        self._claimed[key] = (owner, name)
        return Claim(key, budget)

    def release_name(self, key: str) -> None:
        self._claimed.pop(key, None)

    def set_new_experiment(
        self, *, name: str, owner: str, collaborators: Sequence[str], archive_path: Path,
        total_rounds: int = 0, extra: dict[str, str] | None = None, key: str | None = None,
    ) -> ExperimentRecord:
        """Registers an experiment whose archive is already at archive_path; queues it.
        `key` is what claim_name returned for it (claimed here when not given)."""
        if key is None:
            key = self.claim_name(owner, name, collaborators).key
        elif self._claimed.get(key) != (owner, name):
            raise InternalError(f"experiment key {key!r} is not claimed for {name!r}")
        try:
            now = self.clock()
            record = ExperimentRecord(
                name=key, owner=owner, collaborators=tuple(collaborators),
                archive_path=str(archive_path), status=ExperimentState.PENDING,
                created_at=now, updated_at=now, total_rounds=total_rounds,
                extra=extra or {}, given_name=name if name != key else "",
            )
            self._save(record)
        finally:
            self.release_name(key)
        self._by_owner[owner, name] = key
        log.info("experiment %s submitted by %s for %s", key, owner, list(collaborators))
        self.schedule()
        return self._experiments[key]

    def _save(self, record: ExperimentRecord) -> None:
        """The store first: what the owner sees is always what a restart finds."""
        try:
            self.store.put_experiment(record)
        except WRITE_ERRORS as exc:
            raise ResourceExhaustedError(
                f"the director's store cannot be written ({exc}); experiment "
                f"{record.name!r} is unchanged") from exc
        self._experiments[record.name] = record

    def update_experiment(self, name: str, **changes: object) -> ExperimentRecord:
        """Changes what an experiment reports (its round, summary), never its status."""
        if "status" in changes:
            raise InternalError(f"the status of experiment {name!r} changes through move()")
        return self._update(name, **changes)

    def move(self, name: str, status: ExperimentState, **changes: object) -> ExperimentRecord:
        """The one way an experiment's status changes: along fedkube.api.experiment's
        TRANSITIONS, or FailedPreconditionError."""
        check_transition(self.experiment(name).status, status, f"experiment {name!r}")
        return self._update(name, status=status, **changes)

    def _update(self, name: str, **changes: object) -> ExperimentRecord:
        record = self.experiment(name).evolve(updated_at=self.clock(), **changes)
        self._save(record)
        return record

    def busy_shards(self) -> set[str]:
        return {c for e in self._experiments.values() if e.status is ExperimentState.IN_PROGRESS
                for c in e.collaborators}

    def in_turn(self) -> list[ExperimentRecord]:
        """The pending experiments in the order they get their shards: round-robin by
        owner, so one owner's thousand never starve another's one. Each owner's oldest go
        first; an owner's running experiments count as turns it has had; between owners
        on the same turn, the one served longest ago goes first."""
        turns: dict[str, int] = {}
        for e in self._experiments.values():
            if e.status is ExperimentState.IN_PROGRESS:
                turns[e.owner] = turns.get(e.owner, 0) + 1
        ordered = []
        for e in self._experiments.values():  # oldest first: the store's order
            if e.status is ExperimentState.PENDING:
                turn = turns.get(e.owner, 0)
                turns[e.owner] = turn + 1
                ordered.append((turn, self._served.get(e.owner, 0), e.created_at, e))
        return [t[-1] for t in sorted(ordered, key=lambda t: t[:3])]

    def schedule(self) -> list[str]:
        """Starts every pending experiment whose shards are all free, in turn."""
        started = []
        busy = self.busy_shards()
        running: dict[str, int] = {}
        for e in self._experiments.values():
            if e.status is ExperimentState.IN_PROGRESS:
                running[e.owner] = running.get(e.owner, 0) + 1
        for experiment in self.in_turn():
            if busy.intersection(experiment.collaborators):
                continue
            if self.limits.max_running and running.get(experiment.owner, 0) >= \
                    self.limits.max_running:
                continue
            running[experiment.owner] = running.get(experiment.owner, 0) + 1
            busy.update(experiment.collaborators)
            record = self.move(experiment.name, ExperimentState.IN_PROGRESS)
            self._served[record.owner] = next(self._starts)
            self._assign(record)
            if self.runner is not None:
                self.runner.start(record)
            started.append(record.name)
            log.info("experiment %s started", record.name,
                     extra={"experiment": record.name, "round": record.current_round})
        return started

    def queue_position(self, name: str) -> int:
        """0 when running or done; otherwise 1 + the pending experiments ahead of it."""
        experiment = self.experiment(name)
        if experiment.status is not ExperimentState.PENDING:
            return 0
        return [e.name for e in self.in_turn()].index(name) + 1

    def _assign(self, experiment: ExperimentRecord) -> None:
        for collaborator in experiment.collaborators:
            state = self._envoys.get(collaborator)
            if state is not None:
                state.current_experiment = experiment.name
        self._notify()

    def _notify(self) -> None:
        changed, self._dispatch_changed = self._dispatch_changed, asyncio.Event()
        changed.set()

    def _dispatched(self, envoy: str) -> str | None:
        state = self._envoys.get(envoy)
        if state is None or state.current_experiment is None:
            return None
        experiment = self._experiments.get(state.current_experiment)
        if experiment is None or experiment.status is not ExperimentState.IN_PROGRESS:
            return None
        return experiment.name

    async def wait_experiment(self, envoy: str) -> str:
        """Blocks until an experiment is running for this envoy; returns its name.

        An envoy that reconnects while its experiment runs gets the same name again.
        """
        if envoy not in self._envoys:
            raise NotFoundError(f"unknown shard {envoy!r}: register it first")
        while (name := self._dispatched(envoy)) is None:
            await self._dispatch_changed.wait()
        return name

    def get_experiment_data(self, name: str, collaborator: str) -> Path:
        experiment = self.experiment(name)
        if collaborator not in experiment.collaborators:
            raise PermissionDeniedError(
                f"{collaborator!r} is not a collaborator of experiment {name!r}")
        return Path(experiment.archive_path)

    def finish_experiment(self, name: str, status: ExperimentState, error: str = "") -> None:
        """Marks an experiment done and frees its shards for the next in the queue; once it
        has ended, a second end (the aggregator's after a collaborator's) is ignored."""
        experiment = self.experiment(name)
        if experiment.status.is_final:
            return
        try:
            self.move(name, status, error=error)
        except ResourceExhaustedError as exc:
            # Not in the store, so not anywhere: written by retry_unwritten once there is
            # room, until then the experiment shows (and a restart finds) it unfinished.
            self._unwritten_ends[name] = (status, error)
            log.error("experiment %s: its end (%s) is not written yet: %s", name,
                      status.value, exc, extra={"experiment": name})
            return
        self._unwritten_ends.pop(name, None)
        for collaborator in experiment.collaborators:
            state = self._envoys.get(collaborator)
            if state is not None and state.current_experiment == name:
                state.current_experiment = None
        log.info("experiment %s %s%s", name, status.value, f": {error}" if error else "",
                 extra={"experiment": name, "status": status.value})
        self._notify()
        self.schedule()

    def retry_unwritten(self) -> None:
        """Experiments' ends that a full store refused, written again (on the event loop,
        from the director's flush loop): the director recovers by itself."""
        for name, (status, error) in list(self._unwritten_ends.items()):
            if name in self._experiments:
                self.finish_experiment(name, status, error)
            else:
                self._unwritten_ends.pop(name, None)

    # -- Outcome callbacks of the aggregator -----------------------------------------------

    def round_closed(self, name: str, *, round_number: int, total_rounds: int,
                     summary: dict[str, str]) -> None:
        if name in self._experiments:
            kept = {k: v for k, v in self._experiments[name].extra.items() if k in _KEPT_EXTRA}
            try:
                self.update_experiment(name, current_round=round_number,
                                       total_rounds=total_rounds, extra={**kept, **summary})
            except ResourceExhaustedError as exc:  # the next round's close writes it
                log.error("experiment %s round %d not recorded: %s", name, round_number, exc,
                          extra={"experiment": name})

    def experiment_done(self, name: str, *, error: str | None) -> None:
        if name in self._experiments:
            self.finish_experiment(name, ExperimentState.FAILED if error
                                   else ExperimentState.FINISHED, error or "")

    def set_experiment_failed(self, name: str, collaborator: str, code: int,
                              description: str) -> None:
        experiment = self.experiment(name)
        if collaborator not in experiment.collaborators:
            raise PermissionDeniedError(
                f"{collaborator!r} is not a collaborator of experiment {name!r}")
        if experiment.status.is_final:
            return
        if self.runner is not None:
            self.runner.stop(name)
        self.finish_experiment(
            name, ExperimentState.FAILED,
            f"collaborator {collaborator} failed (code {code}): {description}")

    # -- the shards' review ---------------------------------------------------------------

    def describe_for_review(self, name: str, shard: str) -> ExperimentRecord:
        """An experiment dispatched to shard, for its review (who submitted it)."""
        experiment = self.experiment(name)
        if shard not in experiment.collaborators:
            raise PermissionDeniedError(f"{shard!r} is not a collaborator of experiment "
                                        f"{name!r}")
        return experiment

    def decide(self, name: str, shard: str, decision: str, reason: str) -> None:
        """A shard's decision on an experiment dispatched to it: `awaiting` holds its rounds
        (nothing times out meanwhile), `refused` leaves it out for good, and when those
        left are fewer than its quorum the experiment fails with every refusal's reason."""
        experiment = self.describe_for_review(name, shard)
        if decision not in DECISIONS:
            raise InvalidArgumentError(f"unknown decision {decision!r}")
        if experiment.status is not ExperimentState.IN_PROGRESS:
            raise FailedPreconditionError(
                f"experiment {name!r} is {experiment.status.value}, not dispatched")
        reviews = reviews_of(experiment.extra)
        if reviews.get(shard, ("", ""))[0] == "refused":
            raise FailedPreconditionError(f"{shard} has refused experiment {name!r} already")
        reviews[shard] = (decision, reason)
        self.update_experiment(name, extra={**experiment.extra,
                                            REVIEW_EXTRA: encoded_reviews(reviews)})
        log.info("experiment %s: %s %s%s", name, shard, decision,
                 f" ({reason})" if reason else "", extra={"experiment": name})
        if self.runner is not None:
            self.runner.reviewed(name, shard, decision, reason)

    def get_experiments_list(self, caller: str, admin: bool = False) -> list[ExperimentRecord]:
        return [e for e in self._experiments.values() if admin or e.owner == caller]

    def get_experiment_status(self, caller: str, name: str,
                              admin: bool = False) -> ExperimentRecord:
        """An owner sees its own experiments; an admin sees every one."""
        return self._owned(caller, name, admin)

    def remove_experiment_data(self, caller: str, name: str, admin: bool = False) -> None:
        experiment = self._owned(caller, name, admin)
        if experiment.status is ExperimentState.IN_PROGRESS:
            if self.runner is not None:
                self.runner.stop(experiment.name)
            self.finish_experiment(experiment.name, ExperimentState.FAILED,
                                   "removed by its owner")
        # Files first: a crash in between leaves a row whose files are gone (its models
        # answer "none yet"), never files that a new experiment of the name could serve.
        key = experiment.name
        shutil.rmtree(self.experiment_dir(key), ignore_errors=True)
        del self._experiments[key]
        self._by_owner.pop((experiment.owner, experiment.title), None)
        self.store.delete_experiment(key)
        log.info("experiment %s removed", key)

    def require_running(self, name: str) -> ExperimentRecord:
        experiment = self.experiment(name)
        if experiment.status is not ExperimentState.IN_PROGRESS:
            raise FailedPreconditionError(
                f"experiment {name!r} is {experiment.status.value}, not in progress")
        return experiment

    def close(self) -> None:
        self.flush()
        self.store.close()


def _tree_bytes(directory: Path) -> int:
    """The bytes of the files under directory (0 when it is gone)."""
    total = 0
    for root, _, files in os.walk(directory):
        for file in files:
            try:
                total += os.lstat(os.path.join(root, file)).st_size
            except OSError:  # removed meanwhile
                continue
    return total
