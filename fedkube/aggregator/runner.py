"""Runs the aggregators of a director's experiments and answers for their artefacts.

The director hands over each experiment as it starts (`ExperimentRunner.start`); this
module reads its plan and initial model, drives round timeouts, and reports back through
the director's `Outcome` callbacks. Models and metrics live in the experiment's directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Protocol

from fedkube.aggregator.experiment import ExperimentAggregator, MetricEvent, Outcome
from fedkube.api.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from fedkube.api.plan import Plan
from fedkube.proto import base_pb2
from fedkube.tasks.archive import ArchiveError, check_archive, load_task, read_plan
from fedkube.transport.tensors import Model, TensorError, model_from_proto

log = logging.getLogger(__name__)
TICK_S = 0.25
INITIAL_MODEL = "initial_model.pb"


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
    """The owner's initial model if sent, else the built-in task's own initialisation."""
    path = directory / INITIAL_MODEL
    if path.exists():
        try:
            return model_from_proto(base_pb2.ModelProto.FromString(path.read_bytes()))
        except (TensorError, ValueError) as exc:
            raise InvalidArgumentError(f"invalid initial model: {exc}") from exc
    try:
        return load_task(plan, None).init_model(plan.params)
    except ArchiveError as exc:
        raise InvalidArgumentError(f"{exc}; send an initial model with the experiment") from exc


class AggregatorRunner:
    def __init__(self, outcome: Outcome, *, clock: Callable[[], float] = time.time) -> None:
        self.outcome = outcome
        self.clock = clock
        self.aggregators: dict[str, ExperimentAggregator] = {}
        self.ended: dict[str, frozenset[str]] = {}  # experiment -> its collaborators
        self._ticker: asyncio.Task[None] | None = None

    # -- ExperimentRunner protocol (called by the director) ------------------------------

    def inspect(self, archive: Path) -> int:
        """Validates an uploaded experiment; returns its number of rounds."""
        try:
            plan = check_archive(archive)
        except ArchiveError as exc:
            raise InvalidArgumentError(str(exc)) from exc
        initial_model(plan, archive.parent)
        return plan.rounds

    def start(self, experiment: StartedExperiment) -> None:
        archive = Path(experiment.archive_path)
        plan = read_plan(archive)
        last = archive.parent / "last.pb"
        start_round, model = 0, None
        if experiment.current_round > 0 and last.exists():
            # The last aggregated model names its round: trust it over the store, which a
            # crash may have left one round behind.
            proto = base_pb2.ModelProto.FromString(last.read_bytes())
            model = model_from_proto(proto)
            start_round = proto.tensors[0].round_number if proto.tensors else 0
        if model is None:
            model = initial_model(plan, archive.parent)
        dropouts = experiment.extra.get("dropped", "")
        aggregator = ExperimentAggregator(
            name=experiment.name, plan=plan, collaborators=list(experiment.collaborators),
            initial=model, workdir=archive.parent, outcome=self.outcome, clock=self.clock,
            start_round=start_round, dropouts=dropouts.split(",") if dropouts else ())
        self.aggregators[experiment.name] = aggregator
        self._ensure_ticker()
        log.info("aggregator for %s: %d rounds over %s", experiment.name, plan.rounds,
                 list(experiment.collaborators), extra={"experiment": experiment.name})

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
        while self.aggregators:
            self.tick()
            await asyncio.sleep(TICK_S)

    def tick(self) -> None:
        for name, aggregator in list(self.aggregators.items()):
            aggregator.tick()
            if aggregator.done:
                self._retire(name)

    def _retire(self, name: str) -> ExperimentAggregator | None:
        aggregator = self.aggregators.pop(name, None)
        if aggregator is not None:
            self.ended[name] = frozenset(aggregator.collaborators)
        return aggregator

    def aggregator(self, name: str) -> ExperimentAggregator:
        aggregator = self.aggregators.get(name)
        if aggregator is None:
            if name in self.ended:
                raise ExperimentOver(f"experiment {name!r} is over")
            raise NotFoundError(f"no running experiment {name!r}")
        return aggregator

    def over_for(self, name: str, sender: str) -> bool:
        """Whether sender collaborated on an experiment that has ended since this director
        started (a late straggler is told to quit, not that the experiment is unknown)."""
        return sender in self.ended.get(name, frozenset())

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
        aggregator = self.aggregators.get(name)
        if aggregator is None:
            path = directory / "metrics.jsonl"
            if path.exists():
                for line in path.read_text().splitlines():
                    yield MetricEvent(**json.loads(line))
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
