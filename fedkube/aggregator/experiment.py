"""One experiment's rounds: tasks for collaborators, checked results, FedAvg, metrics.

Round r (0-based) hands out the global model m_r; each collaborator validates it on its
own data, trains from it, and sends both results. The round closes when every active
collaborator has trained, or at the round timeout when a quorum has; m_{r+1} is the
weighted average. After the last round, one validation-only round scores the final model.
The best model is the global model with the best aggregated validation metric.

A collaborator that misses a round's deadline is dropped: later rounds do not wait for it,
and its late results are refused. It rejoins when it next asks for tasks.

A result sent again for a task already taken (this round's, or the round it closed) is
acknowledged and ignored, as OpenFL's aggregator does: an upload whose reply was lost on
the way is retried, and must not fail its collaborator or count twice.

The current round is in one `RoundPhase` at a time, and moves only along
`ROUND_TRANSITIONS`: open (tasks out, results in) -> closing (scored, averaged, saved;
nothing in or out) -> open again for the next round, until the experiment is over
(finished, failed, or stopped by the director), from either. What a result must carry to
be taken is checked in fedkube.aggregator.results.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from fedkube.aggregator import metrics
from fedkube.aggregator.fedavg import Model, StreamingFedAvg
from fedkube.aggregator.results import TRAIN, VALIDATE, check_task_results
from fedkube.api.errors import (
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from fedkube.api.plan import Plan
from fedkube.proto import aggregator_pb2, base_pb2
from fedkube.transport.tensors import encode_model, to_named_tensor

log = logging.getLogger(__name__)
T = TypeVar("T")

AGGREGATOR = "aggregator"
WAIT_SECONDS = 1
# How long the collaborators of a (re)started experiment get to start up and ask for their
# first tasks (process or Pod start, image pull, install_requirements) before it fails.
STARTUP_TIMEOUT_S = 900.0
# Results up to this size are checked and added, and models up to it averaged and saved,
# on the event loop: a thread hop costs more than the work (profiled with py-spy at 32
# collaborators, docs/benchmarks.md).
INLINE_RESULT_BYTES = 256 << 10


class RoundPhase(StrEnum):
    """Where the current round stands."""

    OPEN = "open"  # hands out tasks and takes results
    CLOSING = "closing"  # scored, averaged and saved: takes no results, hands out no tasks
    OVER = "over"  # the experiment has ended (finished, failed or stopped): no more rounds


ROUND_TRANSITIONS: Mapping[RoundPhase, frozenset[RoundPhase]] = MappingProxyType({
    # The last result in, or a timeout on quorum; a failure or the director's stop.
    RoundPhase.OPEN: frozenset({RoundPhase.CLOSING, RoundPhase.OVER}),
    # The next round opens; or the final validation is scored, a save fails, or a stop.
    RoundPhase.CLOSING: frozenset({RoundPhase.OPEN, RoundPhase.OVER}),
    RoundPhase.OVER: frozenset(),
})


@dataclass(frozen=True)
class MetricEvent:
    origin: str  # a collaborator, or "aggregator" for the federated figure
    task: str
    name: str
    value: float
    round: int


def check_data_size(sender: str, data_size: int, registered: int | None) -> None:
    """A training result's weight may not exceed the samples its shard registered."""
    if registered and data_size > registered:
        raise InvalidArgumentError(f"data_size {data_size} exceeds the {registered} samples "
                                   f"shard {sender} registered")


METRICS_FILE = "metrics.jsonl"


def save_model(workdir: Path, filename: str, model: Model, round_number: int) -> None:
    """model as workdir/filename, replaced whole (a crash leaves the old one)."""
    # Straight from the arrays: building the message first cost three more copies.
    tmp = workdir / f".{filename}.tmp"
    with tmp.open("wb") as file:
        for segment in encode_model(model, round_number):
            file.write(segment)
    tmp.replace(workdir / filename)


def append_metric(workdir: Path, event: MetricEvent) -> None:
    with (workdir / METRICS_FILE).open("a") as sink:
        sink.write(json.dumps(asdict(event)) + "\n")


def resumed_events(workdir: Path, start_round: int) -> list[MetricEvent]:
    """The metrics of the rounds closed before a restart (the half-done round runs again,
    so its metrics are dropped from the file too)."""
    path = workdir / METRICS_FILE
    if not path.exists():
        return []
    events = [e for e in read_metric_events(path) if e.round < start_round]
    path.write_text("".join(json.dumps(asdict(e)) + "\n" for e in events))
    return events


def read_metric_events(path: Path) -> list[MetricEvent]:
    """The events of a metrics.jsonl; a line that does not parse (the torn last line a
    full disk leaves) is skipped with a warning, not a reason to lose the experiment."""
    events = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            events.append(MetricEvent(**json.loads(line)))
        except (ValueError, TypeError) as exc:
            log.warning("%s line %d skipped: %s", path, number, exc)
    return events


class Outcome(Protocol):
    """What the aggregator reports to its host (the director) as rounds progress."""

    def round_closed(self, name: str, *, round_number: int, total_rounds: int,
                     summary: dict[str, str]) -> None: ...

    def experiment_done(self, name: str, *, error: str | None) -> None: ...


class ShardReview:
    """The shards' decisions as an experiment's rounds keep them (both kinds of rounds;
    fedkube.director.core.Director.decide): while one awaits its data owner nobody gets
    tasks and nothing times out; a refused one leaves the collaborators for good."""

    def __init__(self) -> None:
        self.awaiting: set[str] = set()
        self.refusals: dict[str, str] = {}

    def take(self, collaborators: list[str], shard: str, decision: str, reason: str) -> bool:
        """Applies a collaborator's decision; True when it refused (and has left
        collaborators)."""
        if decision == "awaiting":
            self.awaiting.add(shard)
            return False
        self.awaiting.discard(shard)
        if decision != "refused":
            return False
        self.refusals[shard] = reason
        collaborators.remove(shard)
        return True

    def failure(self, left: int, quorum: int) -> str | None:
        """Why the experiment cannot run, when the refusals left fewer than its quorum:
        each refusal's reason."""
        if left >= quorum:
            return None
        reasons = "; ".join(f"{shard}: {reason or 'no reason given'}"
                            for shard, reason in sorted(self.refusals.items()))
        return (f"refused by its shards ({reasons}); {left} collaborator"
                f"{'' if left == 1 else 's'} left, quorum {quorum}")


class ExperimentAggregator:
    def __init__(self, *, name: str, plan: Plan, collaborators: list[str], initial: Model,
                 workdir: Path, outcome: Outcome, clock: Callable[[], float],
                 start_round: int = 0, best_metric: float | None = None,
                 dropouts: Sequence[str] = (), samples: Mapping[str, int] | None = None
                 ) -> None:
        """start_round > 0 resumes after a restart from the last aggregated model.
        samples: what each collaborator's shard registered, the cap of its training
        weight (a data_size past it is refused: FedAvg would let it control the
        average)."""
        self.samples = dict(samples or {})
        self.name, self.plan, self.collaborators = name, plan, list(collaborators)
        self.workdir, self.outcome, self.clock = workdir, outcome, clock
        self.model = initial
        self.round = start_round
        self.quorum = min(plan.min_collaborators or len(collaborators), len(collaborators))
        self.phase = RoundPhase.OPEN
        self.error: str | None = None
        self.best_metric = best_metric
        self.events: list[MetricEvent] = []
        self.dropped: set[str] = set()  # out now: missed a deadline, not back yet
        self.dropouts: set[str] = set(dropouts)  # ever dropped, for the status
        self.shard_review = ShardReview()
        self.changed = asyncio.Event()
        if start_round > 0:
            self._resume_metrics(start_round)
        # Held while a result is checked and added, and while a round closes, off the
        # event loop; the loop skips timeouts meanwhile so a round never closes under a
        # half-added result, nor twice.
        self._receiving = asyncio.Lock()
        # Senders whose checked training result is being added after its reply (receive).
        self._committing: set[str] = set()
        # Result adds after their replies, and round closes a timeout started.
        self._background: set[asyncio.Task[None]] = set()
        self._tensors: dict[str, base_pb2.NamedTensor] = {}
        # Who sent which task in the round last closed: its repeats are acknowledged.
        self._taken_last_round: dict[str, set[str]] = {}
        self._start_round()

    def _resume_metrics(self, start_round: int) -> None:
        """Keeps the metrics of the rounds closed before a restart (the half-done round
        runs again) and the best score among them."""
        self.events = resumed_events(self.workdir, start_round)
        scores = [e.value for e in self.events
                  if e.origin == AGGREGATOR and e.task == "aggregated_validate"]
        for value in scores:
            if self._better(value):
                self.best_metric = value
        log.info("experiment %s resumes at round %d (best %s so far: %s)", self.name,
                 start_round, self.plan.metric, self.best_metric,
                 extra={"experiment": self.name, "round": start_round})

    # -- round bookkeeping --------------------------------------------------------------

    def _start_round(self, fedavg: StreamingFedAvg | None = None) -> None:
        self._tensors.clear()
        self._fedavg = fedavg or StreamingFedAvg(self.model)
        self._trained: set[str] = set()
        self._validated: dict[str, tuple[float, float]] = {}  # collaborator -> (metric, weight)
        self._round_opened = self.clock()
        # The round's clock starts when a collaborator first picks it up, so collaborator
        # start-up never counts against the round timeout.
        self._round_started: float | None = None

    @property
    def done(self) -> bool:
        """Whether the experiment has ended (finished, failed or stopped)."""
        return self.phase is RoundPhase.OVER

    def _enter(self, phase: RoundPhase) -> None:
        """Moves the round along ROUND_TRANSITIONS; any other move is a bug."""
        if phase not in ROUND_TRANSITIONS[self.phase]:
            raise InternalError(f"experiment {self.name!r} round {self.round}: no move "
                                f"from {self.phase.value} to {phase.value}")
        self.phase = phase

    def _begin_close(self) -> None:
        """Open -> closing. A close that a timeout began finds the round closing already;
        one that an experiment stopped meanwhile runs into leaves it over."""
        if self.phase is RoundPhase.OPEN:
            self._enter(RoundPhase.CLOSING)

    def _signal(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    @property
    def final_validation(self) -> bool:
        return self.round >= self.plan.rounds

    def tasks_for(self, collaborator: str) -> list[str]:
        if self.phase is not RoundPhase.OPEN:
            return []
        pending = [] if collaborator in self._validated else [VALIDATE]
        if (not self.final_validation and collaborator not in self._trained
                and collaborator not in self._committing):
            pending.append(TRAIN)
        return pending

    def _record(self, event: MetricEvent) -> None:
        self.events.append(event)
        append_metric(self.workdir, event)
        self._signal()

    def _better(self, value: float) -> bool:
        if self.best_metric is None:
            return True
        return value > self.best_metric if self.plan.higher_is_better else value < self.best_metric

    def _score_round(self) -> tuple[float | None, bool]:
        """Aggregated validation metric of the current global model, if anyone validated,
        and whether it is the best so far (then best.pb is to be saved)."""
        if not self._validated:
            return None, False
        weights = sum(w for _, w in self._validated.values())
        value = sum(m * w for m, w in self._validated.values()) / weights
        self._record(MetricEvent(AGGREGATOR, "aggregated_validate", self.plan.metric, value,
                                 self.round))
        if not self._better(value):
            return value, False
        self.best_metric = value
        return value, True

    def _save(self, filename: str, model: Model, round_number: int) -> None:
        save_model(self.workdir, filename, model, round_number)

    def active(self) -> set[str]:
        return set(self.collaborators) - self.dropped

    def _drop(self, missing: set[str]) -> None:
        if missing:
            self.dropped |= missing
            self.dropouts |= missing
            metrics.DROPOUTS.inc(len(missing))
            log.warning("experiment %s round %d closed without %s; dropped until they ask "
                        "for tasks again", self.name, self.round, sorted(missing),
                        extra={"experiment": self.name, "round": self.round})

    async def _close_round(self) -> None:
        """Round r becomes m_{r+1}. The model-sized work (the average, saving best.pb and
        last.pb, zeroing the next round's sum: 0.3-0.5 s at 256 MiB, 1-2 s at 1 GiB on 2
        cores) runs in a thread for all but small models, so the director answers other
        calls meanwhile. Callers hold the receiving lock: no result is added and no
        timeout closes it twice."""
        self._begin_close()
        opened = self._round_started or self._round_opened
        metrics.ROUND_SECONDS.observe(self.clock() - opened)
        score, best = self._score_round()
        self._record(MetricEvent(AGGREGATOR, "train", "collaborators",
                                 float(len(self._trained)), self.round))
        closing, scored, fedavg = self.round, self.model, self._fedavg

        def average_and_save() -> tuple[Model, StreamingFedAvg]:
            if best:
                self._save("best.pb", scored, closing)
            model = fedavg.result()
            self._save("last.pb", model, closing + 1)
            return model, StreamingFedAvg(model)

        try:
            model, next_fedavg = await self._model_sized(average_and_save)
        except Exception as exc:  # a full disk, say: the experiment fails, not the director
            log.exception("experiment %s: closing round %d failed", self.name, closing)
            self.fail(f"closing round {closing} failed: {exc}")
            return
        if self.done:  # failed or stopped meanwhile
            return
        log.info("experiment %s round %d closed with %d results (%s %s)", self.name,
                 closing, len(self._trained), self.plan.metric,
                 "n/a" if score is None else f"{score:.4g}",
                 extra={"experiment": self.name, "round": closing,
                        "results": len(self._trained), "metric": score})
        self._taken_last_round = {TRAIN: set(self._trained), VALIDATE: set(self._validated)}
        self.model, self.round = model, closing + 1
        self.outcome.round_closed(self.name, round_number=self.round,
                                  total_rounds=self.plan.rounds,
                                  summary=self._summary(score))
        self._start_round(next_fedavg)
        self._enter(RoundPhase.OPEN)

    async def _end(self) -> None:
        """The final validation is in: scores the final model, saves it as best.pb if it
        is (off the loop, as a round's close), and ends the experiment."""
        self._begin_close()
        score, best = self._score_round()
        if best:
            model, round_number = self.model, self.round
            try:
                await self._model_sized(lambda: self._save("best.pb", model, round_number))
            except Exception as exc:
                log.exception("experiment %s: saving the final model failed", self.name)
                self.fail(f"saving the final model failed: {exc}")
                return
        self._finish(score=score)

    async def _model_sized(self, work: Callable[[], T]) -> T:
        """work() in a thread, but on the loop for small models: the hop costs more."""
        if sum(v.nbytes for v in self.model.values()) <= INLINE_RESULT_BYTES:
            return work()
        return await asyncio.to_thread(work)

    async def _when_free(self, work: Callable[[], Coroutine[None, None, None]]) -> None:
        """work() once no result is being added (for a timeout's close or end)."""
        async with self._receiving:
            if not self.done:
                await work()

    def _summary(self, score: float | None) -> dict[str, str]:
        summary = {"metric": self.plan.metric,
                   "best_metric": "" if self.best_metric is None else f"{self.best_metric:.6g}",
                   "last_metric": "" if score is None else f"{score:.6g}"}
        if self.dropouts:
            summary["dropped"] = ",".join(sorted(self.dropouts))
        return summary

    def _finish(self, error: str | None = None, *, score: float | None = None) -> None:
        """Ends the experiment: with an error, or (from _end) finished, with the final
        model's score."""
        if self.done:
            return
        self._enter(RoundPhase.OVER)
        self.error = error
        if error is None:
            self.outcome.round_closed(self.name, round_number=self.round,
                                      total_rounds=self.plan.rounds,
                                      summary=self._summary(score))
        self.outcome.experiment_done(self.name, error=error)
        self._signal()

    def stop(self) -> None:
        """Ends the experiment without reporting it: its host (the director) ended it."""
        if not self.done:
            self._enter(RoundPhase.OVER)
            self._signal()

    async def _advance(self) -> None:
        active = self.active()
        if self.final_validation:
            if self._validated and active <= set(self._validated):
                await self._end()
        elif self._trained and active <= self._trained:
            await self._close_round()

    def _in_background(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def tick(self) -> None:
        """Closes a round that ran past its timeout on quorum, or fails the experiment."""
        if self.phase is not RoundPhase.OPEN or self._receiving.locked():
            return
        now = self.clock()
        if self.shard_review.awaiting:  # an answer may take days: the clocks wait too
            self._round_opened = now
            if self._round_started is not None:
                self._round_started = now
            return
        if self._round_started is None:
            if now - self._round_opened >= STARTUP_TIMEOUT_S:
                self._finish(f"no collaborator asked for round {self.round}'s tasks within "
                             f"{STARTUP_TIMEOUT_S:g}s")
            return
        if now - self._round_started < self.plan.round_timeout_s:
            return
        have = set(self._validated) if self.final_validation else self._trained
        if len(have) >= self.quorum:
            self._drop(self.active() - have)
            self._enter(RoundPhase.CLOSING)  # from now, not when the lock is taken
            self._in_background(self._when_free(
                self._end if self.final_validation else self._close_round))
        else:
            self._finish(f"round {self.round} timed out after {self.plan.round_timeout_s:g}s "
                         f"with {len(have)} of {len(self.collaborators)} results; quorum is "
                         f"{self.quorum}")

    def fail(self, error: str) -> None:
        self._finish(error)

    def review(self, shard: str, decision: str, reason: str) -> None:
        """A shard's decision: awaiting holds the rounds, refused leaves it out for good
        (failing the experiment when those left are fewer than its quorum)."""
        if self.done or shard not in self.collaborators:
            return
        if self.shard_review.take(self.collaborators, shard, decision, reason):
            self.dropped.discard(shard)
            error = self.shard_review.failure(len(self.collaborators), self.quorum)
            if error is not None:
                self._finish(error)
                return
            self._in_background(self._when_free(self._advance))
        if decision != "awaiting":
            self._signal()

    # -- RPCs ----------------------------------------------------------------------------

    def _check_sender(self, sender: str) -> None:
        if sender not in self.collaborators:
            raise PermissionDeniedError(
                f"{sender!r} is not a collaborator of experiment {self.name!r}")

    def get_tasks(self, sender: str) -> aggregator_pb2.GetTasksResponse:
        self._check_sender(sender)
        if sender in self.dropped and not self.done:
            self.dropped.discard(sender)
            log.info("experiment %s: %s rejoins at round %d", self.name, sender, self.round,
                     extra={"experiment": self.name, "round": self.round,
                            "collaborator": sender})
        if self.done:
            return aggregator_pb2.GetTasksResponse(round_number=self.round, quit=True)
        if self.shard_review.awaiting:
            return aggregator_pb2.GetTasksResponse(round_number=self.round,
                                                   sleep_time=WAIT_SECONDS)
        tasks = self.tasks_for(sender)
        if tasks and self._round_started is None:
            self._round_started = self.clock()
        if not tasks:
            return aggregator_pb2.GetTasksResponse(round_number=self.round,
                                                   sleep_time=WAIT_SECONDS)
        return aggregator_pb2.GetTasksResponse(
            round_number=self.round,
            tasks=[aggregator_pb2.Task(name=t, function_name=t, task_type=t) for t in tasks])

    def tensor_values(self, sender: str, name: str, round_number: int
                      ) -> npt.NDArray[np.float32]:
        """The global model's tensor for a collaborator of this round (streamed from
        memory by StreamAggregatedTensor)."""
        self._check_sender(sender)
        if round_number != self.round:
            raise InvalidArgumentError(f"round {round_number} is not open; the aggregator is "
                                       f"at round {self.round}")
        if name not in self.model:
            raise NotFoundError(f"no tensor {name!r} in experiment {self.name!r}")
        return self.model[name]

    def get_tensor(self, sender: str, name: str, round_number: int, *,
                   tags: Sequence[str] = (), require_lossless: bool = False
                   ) -> base_pb2.NamedTensor:
        """The global model's tensor (fedkube's collaborators send no tags)."""
        self.tensor_values(sender, name, round_number)
        # Serialized once per round, however many collaborators ask.
        if name not in self._tensors:
            self._tensors[name] = to_named_tensor(name, self.model[name],
                                                  round_number=self.round)
        return self._tensors[name]

    def _repeat(self, sender: str, results: aggregator_pb2.TaskResults) -> bool:
        """Whether the sender's result for this task and round was already taken."""
        task, r = results.task_name, results.round_number
        if r == self.round:
            taken = self._trained | self._committing if task == TRAIN else set(self._validated)
        elif r == self.round - 1:
            taken = self._taken_last_round.get(task, set())
        else:
            return False
        if sender not in taken:
            return False
        log.info("experiment %s: %s sent its %s result for round %d again; ignored",
                 self.name, sender, task, r,
                 extra={"experiment": self.name, "round": r, "collaborator": sender})
        metrics.REPEATED_RESULTS.inc()
        return True

    def _check_results(self, sender: str, results: aggregator_pb2.TaskResults,
                       payloads: Sequence[memoryview] | None = None
                       ) -> tuple[Model, dict[str, float]]:
        """Every check happens before any result touches the model: here whether the
        round takes it, in fedkube.aggregator.results what it carries."""
        self._check_sender(sender)
        if self.phase is RoundPhase.OVER:
            raise InvalidArgumentError(f"experiment {self.name!r} is over")
        if results.round_number != self.round:
            raise InvalidArgumentError(f"round {results.round_number} is closed or not open; "
                                       f"the aggregator is at round {self.round}")
        if self.phase is RoundPhase.CLOSING:
            raise InvalidArgumentError(f"round {self.round} is closing: it takes no more "
                                       f"results")
        if results.task_name not in self.tasks_for(sender):
            raise InvalidArgumentError(f"{sender} has no pending {results.task_name!r} task in "
                                       f"round {self.round} (already sent, or unknown task)")
        if results.task_name == TRAIN:
            check_data_size(sender, results.data_size, self.samples.get(sender))
        return check_task_results(results, model=self.model, metric=self.plan.metric,
                                  payloads=payloads)

    def _weight(self, results: aggregator_pb2.TaskResults) -> float:
        return float(results.data_size) if self.plan.weighting == "samples" else 1.0

    def _accept(self, sender: str, results: aggregator_pb2.TaskResults,
                payloads: Sequence[memoryview] | None = None
                ) -> tuple[dict[str, float], float]:
        """The heavy part of taking a result (checks, the FedAvg update): thread-safe
        against the event loop while the receiving lock is held."""
        update, figures = self._check_results(sender, results, payloads)
        weight = self._weight(results)
        if results.task_name == TRAIN:
            self._fedavg.add(update, weight)
        return figures, weight

    async def _accepted(self, sender: str, results: aggregator_pb2.TaskResults,
                        figures: dict[str, float], weight: float) -> None:
        for name, value in figures.items():
            self._record(MetricEvent(sender, results.task_name, name, value, self.round))
        metrics.RESULTS.labels(results.task_name).inc()
        if results.task_name == TRAIN:
            self._trained.add(sender)
        else:
            self._validated[sender] = (figures[self.plan.metric], weight)
        await self._advance()

    async def receive(self, sender: str, results: aggregator_pb2.TaskResults,
                      payloads: Sequence[memoryview] | None = None) -> None:
        """Takes a result, with the model-sized work in threads, so a large model never
        stalls the director's other calls (health checks, other experiments). `payloads`
        are the tensors' bytes when the message was parsed without them.

        A large training result is acknowledged once checked: its FedAvg update (most
        of the work) runs after the reply, still holding the receiving lock, so no other
        result is added and no round closes meanwhile, and the sender's task counts as
        done from the reply on. The sender's upload then ends when its bytes are in and
        checked, not when they are summed."""
        size = sum(len(p) for p in payloads) if payloads is not None else results.ByteSize()
        self._check_sender(sender)
        await self._receiving.acquire()
        handed_off = False
        try:
            if self._repeat(sender, results):
                return
            started = time.perf_counter()
            if size <= INLINE_RESULT_BYTES:
                figures, weight = self._accept(sender, results, payloads)
                metrics.AGGREGATION_SECONDS.observe(time.perf_counter() - started)
                await self._accepted(sender, results, figures, weight)
                return
            update, figures = await asyncio.to_thread(self._check_results, sender, results,
                                                      payloads)
            if results.task_name != TRAIN:
                metrics.AGGREGATION_SECONDS.observe(time.perf_counter() - started)
                await self._accepted(sender, results, figures, self._weight(results))
                return
            self._committing.add(sender)
            self._in_background(self._commit(sender, results, update, figures, started))
            handed_off = True
        finally:
            if not handed_off:
                self._receiving.release()

    async def _commit(self, sender: str, results: aggregator_pb2.TaskResults, update: Model,
                      figures: dict[str, float], started: float) -> None:
        try:
            weight = self._weight(results)
            await asyncio.to_thread(self._fedavg.add, update, weight)
            metrics.AGGREGATION_SECONDS.observe(time.perf_counter() - started)
            if not self.done:
                await self._accepted(sender, results, figures, weight)
        except Exception as exc:  # after the reply: the experiment fails, not the director
            log.exception("experiment %s: adding %s's result failed", self.name, sender)
            self.fail(f"adding {sender}'s result to round {self.round} failed: {exc}")
        finally:
            self._committing.discard(sender)
            self._receiving.release()


def expected_result_bytes(model: Model) -> int:
    """A size hint for reassembling a result: the model's float32 bytes plus headers."""
    return sum(v.nbytes for v in model.values()) + 4096 * (len(model) + 1)
