"""Runs the aggregators of a director's experiments and answers for their artefacts.

The director hands over each experiment as it starts (`ExperimentRunner.start`); this
module reads its plan and initial model, drives round timeouts, and reports back through
the director's `Outcome` callbacks. Models and metrics live in the experiment's directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Protocol

from google.protobuf.message import DecodeError

from fedkube.aggregator.experiment import (
    ExperimentAggregator,
    MetricEvent,
    Outcome,
    read_metric_events,
)
from fedkube.aggregator.openfl_rounds import OpenFLRounds
from fedkube.api.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
)
from fedkube.api.plan import Plan
from fedkube.api.review import reviews_of
from fedkube.openfl.workspace import (
    PLAN_NAME,
    OpenFLArchiveError,
    is_openfl_archive,
    point_at_director,
    read_openfl_plan,
)
from fedkube.proto import base_pb2
from fedkube.tasks.archive import (
    ArchiveError,
    check_archive,
    check_builtin_plan,
    load_task,
    read_plan,
)
from fedkube.tasks.params import ParamsError
from fedkube.transport.model_files import has_model, read_model
from fedkube.transport.tensors import Model, TensorError, model_from_proto

log = logging.getLogger(__name__)
TICK_S = 0.25
# An experiment's rounds: fedkube's own, or OpenFL 1.6's (fedkube.aggregator.openfl_rounds).
Rounds = ExperimentAggregator | OpenFLRounds


class ExperimentOver(InvalidArgumentError):
    """A call for an experiment whose aggregator has finished."""


class StartedExperiment(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def collaborators(self) -> tuple[str, ...]: ...
    @property
    def archive_path(self) -> str: ...
    @property
    def current_round(self) -> int: ...
    @property
    def extra(self) -> dict[str, str]: ...


def initial_model(plan: Plan, directory: Path) -> Model:
    """The owner's initial model if sent, else the built-in task's own initialisation.
    A sent model is read as fedkube.transport.model_files stored it: its tensors views of
    the mapped file, in memory once (an earlier version's initial_model.pb is read too)."""
    sent = _sent_model(directory)
    if sent is not None:
        return sent
    try:
        return load_task(plan, None).init_model(plan.params)
    except ArchiveError as exc:
        raise InvalidArgumentError(f"{exc}; send an initial model with the experiment") from exc


def _sent_model(directory: Path) -> Model | None:
    try:
        return read_model(directory)
    except (TensorError, ValueError, OSError) as exc:  # ModelFileError is a ValueError
        raise InvalidArgumentError(f"invalid initial model: {exc}") from exc


class AggregatorRunner:
    def __init__(self, outcome: Outcome, *, clock: Callable[[], float] = time.time) -> None:
        self.outcome = outcome
        self.clock = clock
        self.aggregators: dict[str, ExperimentAggregator] = {}
        self.openfl: dict[str, OpenFLRounds] = {}
        # An OpenFL collaborator names its experiment by the federation UUID of its plan.
        self.aliases: dict[str, str] = {}
        self.ended: dict[str, frozenset[str]] = {}  # experiment -> its collaborators
        self._ticker: asyncio.Task[None] | None = None
        # Where collaborators reach the aggregators (the director's port, and the address
        # it advertises if any): written into OpenFL plans (fedkube.openfl.workspace).
        self.port: int | None = None
        self.address: str | None = None
        # The samples a shard registered (0 or None: unknown), a cap on its weights.
        self.registered_samples: Callable[[str], int | None] = lambda shard: None

    # -- ExperimentRunner protocol (called by the director) ------------------------------

    def inspect(self, archive: Path, name: str) -> int:
        """Validates an uploaded experiment; returns its number of rounds. An OpenFL
        experiment's plan is pointed at this director for its collaborators."""
        if is_openfl_archive(archive):
            try:
                rounds = read_openfl_plan(archive).rounds
            except OpenFLArchiveError as exc:
                raise InvalidArgumentError(f"OpenFL experiment: {exc}") from exc
            if not has_model(archive.parent):
                raise InvalidArgumentError("OpenFL experiment: no initial model was sent")
            if self.port is None:
                raise FailedPreconditionError("this director serves no aggregator port")
            point_at_director(archive, experiment=name, port=self.port, address=self.address)
            return rounds
        try:
            plan = check_archive(archive)
            check_builtin_plan(plan)
        except (ArchiveError, ParamsError) as exc:
            raise InvalidArgumentError(str(exc)) from exc
        initial_model(plan, archive.parent)
        return plan.rounds

    def start(self, experiment: StartedExperiment) -> None:
        archive = Path(experiment.archive_path)
        if is_openfl_archive(archive):
            self._start_openfl(experiment, archive)
            return
        plan = read_plan(archive)
        last = archive.parent / "last.pb"
        start_round, model = 0, None
        if experiment.current_round > 0 and last.exists():
            # The last aggregated model names its round: trust it over the store, which a
            # crash may have left one round behind.
            model, start_round = _read_model(last)
        if model is None:
            model = initial_model(plan, archive.parent)
        dropouts = experiment.extra.get("dropped", "")
        aggregator = ExperimentAggregator(
            name=experiment.name, plan=plan, collaborators=list(experiment.collaborators),
            initial=model, workdir=archive.parent, outcome=self.outcome, clock=self.clock,
            start_round=start_round, dropouts=dropouts.split(",") if dropouts else (),
            samples=self._samples(experiment.collaborators))
        self.aggregators[experiment.name] = aggregator
        self._review_again(experiment, aggregator)
        self._ensure_ticker()
        log.info("aggregator for %s: %d rounds over %s", experiment.name, plan.rounds,
                 list(experiment.collaborators), extra={"experiment": experiment.name})

    def _start_openfl(self, experiment: StartedExperiment, archive: Path) -> None:
        plan = read_openfl_plan(archive)
        start_round, previous = 0, None
        model = _sent_model(archive.parent)
        if model is None:
            raise InvalidArgumentError("OpenFL experiment: its initial model is gone")
        if experiment.current_round > 0 and (archive.parent / "last.pb").exists():
            model, start_round = _read_model(archive.parent / "last.pb")
            if (archive.parent / "previous.pb").exists():
                previous = _read_model(archive.parent / "previous.pb")[0]
        best = experiment.extra.get("best_metric", "")
        rounds = OpenFLRounds(
            name=experiment.name, plan=plan, collaborators=list(experiment.collaborators),
            initial=model, workdir=archive.parent, outcome=self.outcome, clock=self.clock,
            start_round=start_round, previous=previous,
            best_metric=float(best) if best else None,
            samples=self._samples(experiment.collaborators))
        rounds.metric_name = experiment.extra.get("metric", "")
        self.openfl[experiment.name] = rounds
        self.aliases[plan.federation_uuid] = experiment.name
        self._review_again(experiment, rounds)
        self._ensure_ticker()
        log.info("aggregator for OpenFL experiment %s (federation %s): %d rounds over %s",
                 experiment.name, plan.federation_uuid, plan.rounds,
                 list(experiment.collaborators), extra={"experiment": experiment.name})

    @staticmethod
    def _review_again(experiment: StartedExperiment, rounds: Rounds) -> None:
        """The shards' decisions before a restart, applied to the resumed rounds."""
        for shard, (decision, reason) in sorted(reviews_of(experiment.extra).items()):
            rounds.review(shard, decision, reason)

    def reviewed(self, name: str, shard: str, decision: str, reason: str) -> None:
        rounds = self.aggregators.get(name) or self.openfl.get(name)
        if rounds is not None:
            rounds.review(shard, decision, reason)

    def _samples(self, collaborators: Iterable[str]) -> dict[str, int]:
        counts = {c: self.registered_samples(c) for c in collaborators}
        return {c: n for c, n in counts.items() if n}

    def remember_ended(self, name: str, collaborators: Iterable[str]) -> None:
        """An experiment that ended before this director started: its late collaborators
        are told to quit, as they are for one that ends while it runs."""
        self.ended[name] = frozenset(collaborators)

    def stop(self, name: str) -> None:
        aggregator = self._retire(name)
        if aggregator is not None:
            aggregator.stop()

    # -- rounds --------------------------------------------------------------------------

    def _ensure_ticker(self) -> None:
        with contextlib.suppress(RuntimeError):  # no loop: ticks come from tests
            if self._ticker is None or self._ticker.done():
                self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    async def _tick_loop(self) -> None:
        while self.aggregators or self.openfl:
            self.tick()
            await asyncio.sleep(TICK_S)

    def tick(self) -> None:
        running: list[tuple[str, Rounds]] = [*self.aggregators.items(), *self.openfl.items()]
        for name, rounds in running:
            rounds.tick()
            if rounds.done:
                self._retire(name)

    def _retire(self, name: str) -> Rounds | None:
        rounds: Rounds | None = self.aggregators.pop(name, None) or self.openfl.pop(name, None)
        if rounds is not None:
            self.ended[name] = frozenset(rounds.collaborators)
        return rounds

    def running(self) -> list[Rounds]:
        return [*self.aggregators.values(), *self.openfl.values()]

    def rounds(self, name: str) -> Rounds:
        """The running experiment a collaborator names: by its name, or (an OpenFL
        collaborator) by its plan's federation UUID."""
        name = self.aliases.get(name, name)
        rounds = self.openfl.get(name)
        if rounds is not None:
            return rounds
        if name.startswith(f"{PLAN_NAME}_"):
            # OpenFL's client retries every other code at once, forever.
            raise UnauthenticatedError(f"no running experiment has federation UUID {name!r}")
        return self.aggregator(name)

    def aggregator(self, name: str) -> ExperimentAggregator:
        aggregator = self.aggregators.get(name)
        if aggregator is None:
            if name in self.ended:
                raise ExperimentOver(f"experiment {name!r} is over")
            raise NotFoundError(f"no running experiment {name!r}")
        return aggregator

    def over_for(self, name: str, sender: str) -> bool:
        """Whether sender collaborated on an experiment that has ended since this director
        started (a late straggler is told to quit, not that the experiment is unknown); an
        OpenFL collaborator of an experiment this director does not know is told so too,
        or OpenFL's client would ask again at once, forever."""
        name = self.aliases.get(name, name)
        if name in self.aggregators or name in self.openfl:
            return False
        return name.startswith(f"{PLAN_NAME}_") or sender in self.ended.get(name, frozenset())

    # -- artefacts -----------------------------------------------------------------------

    @staticmethod
    def trained_model(directory: Path, *, best: bool) -> base_pb2.ModelProto:
        path = directory / ("best.pb" if best else "last.pb")
        if not path.exists():
            raise FailedPreconditionError(
                f"no {'best' if best else 'last'} model yet: no round has been aggregated")
        return base_pb2.ModelProto.FromString(path.read_bytes())

    async def metrics(self, name: str, directory: Path) -> AsyncIterator[MetricEvent]:
        """Every metric so far, then new ones as they come, until the experiment ends."""
        aggregator: Rounds | None = self.aggregators.get(name) or self.openfl.get(name)
        if aggregator is None:
            path = directory / "metrics.jsonl"
            if path.exists():
                for event in read_metric_events(path):
                    yield event
            return
        sent = 0
        while True:
            changed = aggregator.changed
            while sent < len(aggregator.events):
                yield aggregator.events[sent]
                sent += 1
            if aggregator.done:
                return
            await changed.wait()


def _read_model(path: Path) -> tuple[Model, int]:
    """A saved model and the round it names."""
    try:
        proto = base_pb2.ModelProto.FromString(path.read_bytes())
        return model_from_proto(proto), proto.tensors[0].round_number if proto.tensors else 0
    except (TensorError, ValueError, OSError, DecodeError) as exc:
        raise InvalidArgumentError(f"{path.name} is damaged: {exc}") from exc
