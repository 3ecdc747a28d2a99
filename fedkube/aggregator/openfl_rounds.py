"""The rounds of an OpenFL 1.6 interactive-API experiment, as OpenFL's Aggregator runs them,
on fedkube's aggregator (its persistence, its event loop, its port).

Each round every collaborator gets the plan's tasks (FLExperiment's default assigner:
`train`, `locally_tuned_model_validate`, `aggregated_model_validate`, with their function
names and `apply_local`). Tensors are keyed as OpenFL's tensor DB keys them: a
collaborator asks for the round's global model (tags `model`) or, with `delta_updates`,
for its change since the last round (`aggregated`, `delta`); both come back tagged
`compressed` with OpenFL's NoCompressionPipeline layout (float32, shape in the transformer
metadata), which is what OpenFL's collaborator decodes by. Results arrive tagged
`compressed`; `trained` tensors (deltas from the round's model when tagged `delta`) are
averaged, `metric` ones reported.

A collaborator is done with a round when all its tasks are in; the round ends when the
straggler policy says so (all done; or, past a cut-off time, `minimum_reporting` done; or a
share of them). Only done collaborators count, with their data sizes as weights: each
task's aggregation function for trained tensors (a streaming weighted sum for
WeightedAverage, each result added once its sender is done; Median and GeometricMedian
stack the round's results; the adaptive ones step a server-side optimizer from the
weighted average: fedkube.aggregator.openfl_adaptive), the weighted average for metrics.
The best model is the round's global model whenever an aggregated `validate_agg` metric
beats the best so far (higher is better, as in OpenFL). Late results, results of
stragglers and repeats are acknowledged and ignored, as OpenFL's aggregator does. There
is no validation-only round after the last: OpenFL's experiment ends when
`rounds_to_train` rounds have closed.

Differences, on purpose: the model of round r+1 and the best model are saved as they are
made (`last.pb`, `previous.pb`, `best.pb`), so a director restart resumes the round; a
collaborator waiting for the round to end sleeps 1 s, not 10.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedkube.aggregator import metrics
from fedkube.aggregator.experiment import (
    AGGREGATOR,
    STARTUP_TIMEOUT_S,
    MetricEvent,
    Outcome,
    ShardReview,
    append_metric,
    check_data_size,
    resumed_events,
    save_model,
)
from fedkube.aggregator.fedavg import Model, StreamingFedAvg
from fedkube.aggregator.openfl_adaptive import AdaptiveOptimizer
from fedkube.aggregator.results import checked_values
from fedkube.api.errors import FailedPreconditionError, InvalidArgumentError, UnauthenticatedError
from fedkube.openfl.workspace import ADAPTIVE, OpenFLPlan, OpenFLTask
from fedkube.proto import aggregator_pb2, base_pb2
from fedkube.transport.tensors import to_named_tensor

log = logging.getLogger(__name__)
WAIT_SECONDS = 1
# A collaborator with nothing to do in this round is answered when the next round opens,
# or after this long at most (then told to sleep WAIT_SECONDS): OpenFL's `sleep_time` is
# whole seconds, so telling it to sleep made every round at least a second long.
HOLD_TASKS_S = 10.0
COMPRESSED, LOSSY = "compressed", "lossy_compressed"
MODEL, AGGREGATED, DELTA, TRAINED, METRIC, VALIDATE_AGG = (
    "model", "aggregated", "delta", "trained", "metric", "validate_agg")
# Results up to this size are decoded on the event loop; larger ones in a thread.
INLINE_RESULT_BYTES = 256 << 10


@dataclass
class TaskResult:
    weight: float
    trained: Model = field(default_factory=dict)
    # name -> (value, tags), in the order the collaborator sent them
    metrics: dict[str, tuple[float, frozenset[str]]] = field(default_factory=dict)


def weighted_average(tensors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    average: np.ndarray = np.average(np.stack(tensors), weights=weights, axis=0)
    return average.astype(np.float32)


def median(tensors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    middle: np.ndarray = np.median(np.stack(tensors), axis=0)
    return middle.astype(np.float32)


def _l2dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).reshape(-1)))


def geometric_median(tensors: Sequence[np.ndarray], weights: Sequence[float], *,
                     maxiter: int = 4, eps: float = 1e-5, ftol: float = 1e-6) -> np.ndarray:
    """OpenFL's GeometricMedian: Weiszfeld iterations from the weighted average."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    estimate = np.average(np.stack(tensors), weights=w, axis=0)

    def objective(m: np.ndarray, ws: np.ndarray) -> float:
        return float(sum(wi * _l2dist(m, x) for wi, x in zip(ws, tensors, strict=True)))

    value = objective(estimate, w)
    for _ in range(maxiter):
        previous = value
        w = np.asarray([wi / max(eps, _l2dist(estimate, x)) for wi, x in zip(w, tensors,
                                                                               strict=True)])
        w = w / w.sum()
        estimate = np.average(np.stack(tensors), weights=w, axis=0)
        value = objective(estimate, w)
        if abs(previous - value) < ftol * value:
            break
    return estimate.astype(np.float32)


STACKED = {"median": median, "geometric_median": geometric_median}


class OpenFLRounds:
    def __init__(self, *, name: str, plan: OpenFLPlan, collaborators: list[str],
                 initial: Model, workdir: Path, outcome: Outcome, clock: Callable[[], float],
                 start_round: int = 0, previous: Model | None = None,
                 best_metric: float | None = None, samples: Mapping[str, int] | None = None
                 ) -> None:
        self.name, self.plan, self.collaborators = name, plan, list(collaborators)
        self.workdir, self.outcome, self.clock = workdir, outcome, clock
        self.model, self.previous = initial, previous
        self.samples = dict(samples or {})  # each shard's registered size: a weight's cap
        self.round = start_round
        self.best_metric = best_metric
        self.metric_name = ""
        self.error: str | None = None
        self.done = False
        self.events: list[MetricEvent] = []
        self.changed = asyncio.Event()
        self.shard_review = ShardReview()
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()  # a round end a cut-off started
        self._tensors: dict[tuple[str, str], base_pb2.NamedTensor] = {}
        # Adaptive aggregations' optimizers, by task; their moments saved with each model.
        self._optimizers = {
            t.name: AdaptiveOptimizer(self.plan.aggregation[t.name],
                                      self.plan.optimizer.get(t.name, {}), initial)
            for t in plan.tasks if self.plan.aggregation[t.name] in ADAPTIVE}
        for task_name, optimizer in self._optimizers.items():
            saved = workdir / f"optimizer-{task_name}.npz"
            if start_round > 0 and saved.exists():
                optimizer.load(saved)
        if start_round > 0:
            self._resume_metrics(start_round)
        self._start_round()

    # -- round bookkeeping --------------------------------------------------------------

    def _start_round(self) -> None:
        self._results: dict[str, dict[str, TaskResult]] = {c: {} for c in self.collaborators}
        self._done: list[str] = []
        self._stragglers: set[str] = set()
        self._sums = {t.name: StreamingFedAvg(self.model) for t in self.plan.tasks
                      if t.task_type == "train" and self.plan.aggregation[t.name] not in STACKED}
        self._tensors.clear()
        self._opened = self.clock()
        self._policy_started: float | None = None  # OpenFL's start_policy: first tasks out

    def _resume_metrics(self, start_round: int) -> None:
        self.events = resumed_events(self.workdir, start_round)
        log.info("experiment %s resumes at round %d", self.name, start_round,
                 extra={"experiment": self.name, "round": start_round})

    def _record(self, event: MetricEvent) -> None:
        self.events.append(event)
        append_metric(self.workdir, event)
        self._signal()

    def _signal(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def _save(self, filename: str, model: Model, round_number: int) -> None:
        save_model(self.workdir, filename, model, round_number)

    def _check_sender(self, sender: str) -> None:
        if sender not in self.collaborators:
            # OpenFL's client retries every other code at once, forever.
            raise UnauthenticatedError(f"{sender!r} is not a collaborator of experiment "
                                       f"{self.name!r}")

    def _tasks_left(self, sender: str) -> list[OpenFLTask]:
        if sender in self._stragglers:
            return []
        return [t for t in self.plan.tasks if t.name not in self._results[sender]]

    def _cutoff_passed(self) -> bool:
        cutoff = self.plan.straggler.cutoff_s
        return (cutoff is not None and self._policy_started is not None
                and self.clock() - self._policy_started > cutoff)

    def _round_can_end(self) -> bool:
        """OpenFL's straggler_cutoff_check."""
        policy, done, everyone = self.plan.straggler, len(self._done), len(self.collaborators)
        if policy.kind == "percentage":
            return done >= policy.percent * everyone and done >= policy.minimum_reporting
        if not self._cutoff_passed():
            return done == everyone
        return done >= policy.minimum_reporting

    # -- RPCs ----------------------------------------------------------------------------

    def get_tasks(self, sender: str) -> aggregator_pb2.GetTasksResponse:
        self._check_sender(sender)
        if self.done:
            return aggregator_pb2.GetTasksResponse(round_number=self.round, quit=True)
        if self.shard_review.awaiting:
            return aggregator_pb2.GetTasksResponse(round_number=self.round,
                                                   sleep_time=WAIT_SECONDS)
        tasks = self._tasks_left(sender)
        if not tasks:
            return aggregator_pb2.GetTasksResponse(round_number=self.round,
                                                   sleep_time=WAIT_SECONDS)
        if self._policy_started is None:
            self._policy_started = self.clock()
        return aggregator_pb2.GetTasksResponse(
            round_number=self.round,
            tasks=[aggregator_pb2.Task(name=t.name, function_name=t.function_name,
                                       task_type=t.task_type, apply_local=t.apply_local)
                   for t in tasks])

    async def next_tasks(self, sender: str, *, within: float = HOLD_TASKS_S
                         ) -> aggregator_pb2.GetTasksResponse:
        """get_tasks, held while the sender has nothing to do (its round not yet closed)
        until there is something, the experiment ends, or `within` seconds pass."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            changed = self.changed
            reply = self.get_tasks(sender)
            remaining = deadline - loop.time()
            if reply.quit or reply.tasks or remaining <= 0:
                return reply
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return self.get_tasks(sender)

    def tensor_values(self, sender: str, name: str, round_number: int) -> np.ndarray:
        """The round's global model tensor (for fedkube's streaming download)."""
        return self._model_tensor(sender, name, round_number)

    def _model_tensor(self, sender: str, name: str, round_number: int) -> np.ndarray:
        self._check_sender(sender)
        if round_number == self.round and name in self.model:
            return self.model[name]
        if (round_number == self.round - 1 and self.previous is not None
                and name in self.previous):
            return self.previous[name]
        if round_number > self.round:
            raise FailedPreconditionError(f"round {round_number} has not started; the "
                                          f"aggregator is at round {self.round}")
        raise InvalidArgumentError(f"no tensor {name!r} of round {round_number} in "
                                   f"experiment {self.name!r}")

    def get_tensor(self, sender: str, name: str, round_number: int, *,
                   tags: Sequence[str] = (), require_lossless: bool = False
                   ) -> base_pb2.NamedTensor:
        asked = set(tags) - {COMPRESSED, LOSSY}
        lossless = COMPRESSED in tags or require_lossless
        if {AGGREGATED, DELTA} <= asked and round_number != 0:
            self._check_sender(sender)
            if (round_number != self.round or self.previous is None
                    or name not in self.previous or name not in self.model):
                raise InvalidArgumentError(f"no delta of tensor {name!r} for round "
                                           f"{round_number}; the aggregator is at round "
                                           f"{self.round}")
            key = (name, "delta")
            if key not in self._tensors:
                tensor = to_named_tensor(name, self.model[name] - self.previous[name],
                                         round_number=self.round)
                tensor.tags.extend([AGGREGATED, DELTA, COMPRESSED])
                self._tensors[key] = tensor
        elif MODEL in asked or AGGREGATED in asked:
            values = self._model_tensor(sender, name, round_number)
            key = (name, f"model@{round_number}")
            if key not in self._tensors:
                tensor = to_named_tensor(name, values, round_number=round_number)
                tensor.tags.extend([MODEL, COMPRESSED])
                self._tensors[key] = tensor
        else:
            raise InvalidArgumentError(f"no tensor {name!r} tagged {sorted(tags)}: the "
                                       f"aggregator serves the model and its deltas")
        reply = self._tensors[key]
        if reply.lossless != lossless:
            reply = base_pb2.NamedTensor()
            reply.CopyFrom(self._tensors[key])
            reply.lossless = lossless
        return reply

    def _decode(self, sender: str, results: aggregator_pb2.TaskResults,
                payloads: Sequence[memoryview] | None) -> TaskResult:
        """The result's trained tensors and metrics, checked (OpenFL's _process_named_tensor)."""
        if results.data_size <= 0:
            raise InvalidArgumentError(f"data_size must be positive, got {results.data_size}")
        outcome = TaskResult(weight=float(results.data_size))
        for i, tensor in enumerate(results.tensors):
            tags = set(tensor.tags)
            if LOSSY in tags:
                raise InvalidArgumentError(f"tensor {tensor.name!r} is lossy-compressed; this "
                                           f"experiment's pipeline is NoCompressionPipeline")
            if COMPRESSED not in tags:
                raise InvalidArgumentError(f"tensor {tensor.name!r} is not compressed (tags "
                                           f"{sorted(tags)})")
            if len(tensor.transformer_metadata) != 1:
                raise InvalidArgumentError(f"tensor {tensor.name!r} has "
                                           f"{len(tensor.transformer_metadata)} transformer "
                                           f"stages; NoCompressionPipeline has one")
            value = checked_values(tensor, None if payloads is None else payloads[i])
            tags -= {COMPRESSED}
            if METRIC in tags:
                if value.size != 1:
                    raise InvalidArgumentError(f"metric {tensor.name!r} is not a scalar")
                outcome.metrics[tensor.name] = (float(value.reshape(())), frozenset(tags))
                continue
            if TRAINED not in tags:
                continue  # nothing of OpenFL's sends other tensors; nothing would read them
            base = self.model.get(tensor.name)
            if base is None or base.shape != value.shape:
                raise InvalidArgumentError(
                    f"tensor {tensor.name!r} of shape {value.shape} is not in the model"
                    + ("" if base is None else f" (shape {base.shape})"))
            outcome.trained[tensor.name] = (base + value) if DELTA in tags else value
        return outcome

    def _ignored(self, sender: str, results: aggregator_pb2.TaskResults) -> str | None:
        """Why OpenFL's aggregator would acknowledge and drop this result, if it would."""
        if self.done:
            return "the experiment is over"
        if sender in self._stragglers:
            return "it was left out of this round as a straggler"
        if results.round_number != self.round:
            return f"round {results.round_number} is not the current round {self.round}"
        if results.task_name in self._results[sender]:
            metrics.REPEATED_RESULTS.inc()
            return "it was already received"
        return None

    async def receive(self, sender: str, results: aggregator_pb2.TaskResults,
                      payloads: Sequence[memoryview] | None = None) -> None:
        self._check_sender(sender)
        async with self._lock:
            reason = self._ignored(sender, results)
            if reason is not None:
                log.warning("experiment %s: %s's %s result for round %d ignored: %s",
                            self.name, sender, results.task_name, results.round_number, reason,
                            extra={"experiment": self.name, "collaborator": sender})
                return
            task = next((t for t in self.plan.tasks if t.name == results.task_name), None)
            if task is None:
                raise InvalidArgumentError(f"experiment {self.name!r} has no task "
                                           f"{results.task_name!r}")
            if task.task_type == "train":
                check_data_size(sender, results.data_size, self.samples.get(sender))
            size = (sum(len(p) for p in payloads) if payloads is not None
                    else results.ByteSize())
            started = time.perf_counter()
            if size <= INLINE_RESULT_BYTES:
                outcome = self._decode(sender, results, payloads)
            else:
                outcome = await asyncio.to_thread(self._decode, sender, results, payloads)
            self._results[sender][task.name] = outcome
            metrics.RESULTS.labels(task.task_type).inc()
            for metric, (value, _) in outcome.metrics.items():
                self._record(MetricEvent(sender, task.name, metric, value, self.round))
            if not self._tasks_left(sender):
                self._done.append(sender)
                await self._add_trained(sender)
            metrics.AGGREGATION_SECONDS.observe(time.perf_counter() - started)
            if self._round_can_end():
                await self._end_round()

    async def _add_trained(self, sender: str) -> None:
        """A done collaborator's trained tensors into the streaming sums (only done
        collaborators count, as in OpenFL)."""
        for task_name, total in self._sums.items():
            result = self._results[sender].get(task_name)
            if result is not None and result.trained:
                update = {n: result.trained.get(n, self.model[n]) for n in self.model}
                await self._model_sized(functools.partial(total.add, update, result.weight))
                result.trained = {}

    async def _model_sized(self, work: Callable[[], object]) -> None:
        if sum(v.nbytes for v in self.model.values()) <= INLINE_RESULT_BYTES:
            work()
        else:
            await asyncio.to_thread(work)

    def tick(self) -> None:
        """Ends a round whose cut-off time has passed with enough collaborators done, or
        fails an experiment nobody started."""
        if self.done or self._lock.locked():
            return
        if self.shard_review.awaiting:  # an answer may take days: the clocks wait too
            self._opened = self.clock()
            if self._policy_started is not None:
                self._policy_started = self._opened
            return
        if self._policy_started is None:
            if self.clock() - self._opened >= STARTUP_TIMEOUT_S:
                self._finish(f"no collaborator asked for round {self.round}'s tasks within "
                             f"{STARTUP_TIMEOUT_S:g}s")
            return
        if self._cutoff_passed() and self._round_can_end() and not self._closing:
            task = asyncio.get_running_loop().create_task(self._end_round_when_free())
            self._closing.add(task)  # held: the loop keeps only a weak reference
            task.add_done_callback(self._closing.discard)

    async def _end_round_when_free(self) -> None:
        async with self._lock:
            if not self.done and self._round_can_end():
                await self._end_round()

    # -- the end of a round -------------------------------------------------------------

    def _aggregate_metrics(self, task: OpenFLTask, done: list[str]) -> bool:
        """The aggregator's figures for a task; whether the round's model is the best."""
        weights = {c: self._results[c][task.name].weight for c in done}
        total = sum(weights.values())
        first = self._results[done[0]][task.name]
        best = False
        for metric, (_, tags) in first.metrics.items():
            values = [(self._results[c][task.name].metrics[metric][0], weights[c] / total)
                      for c in done if metric in self._results[c][task.name].metrics]
            value = sum(v * w for v, w in values) / sum(w for _, w in values)
            self._record(MetricEvent(AGGREGATOR, task.name, metric, value, self.round))
            if VALIDATE_AGG in tags and math.isfinite(value):
                self.metric_name = self.metric_name or metric
                if self.best_metric is None or self.best_metric < value:
                    self.best_metric = value
                    best = True
        return best

    def _aggregate_trained(self, task: OpenFLTask, done: list[str]) -> Model:
        if task.name in self._sums:
            total = self._sums[task.name]
            if not total.count:
                return {}
            average = total.result()
            optimizer = self._optimizers.get(task.name)
            return average if optimizer is None else optimizer.step(self.model, average)
        function = STACKED[self.plan.aggregation[task.name]]
        results = [self._results[c][task.name] for c in done]
        weights = [r.weight for r in results]
        return {n: function([r.trained.get(n, self.model[n]) for r in results], weights)
                for n in self.model}

    async def _end_round(self) -> None:
        closing, scored = self.round, self.model
        self._stragglers = set(self.collaborators) - set(self._done)
        if self._stragglers:
            log.warning("experiment %s round %d ends without stragglers %s", self.name,
                        closing, sorted(self._stragglers), extra={"experiment": self.name})
            metrics.DROPOUTS.inc(len(self._stragglers))
        opened = self._policy_started or self._opened
        metrics.ROUND_SECONDS.observe(self.clock() - opened)
        best, model = False, dict(self.model)
        for task in self.plan.tasks:
            done = [c for c in self._done if task.name in self._results[c]]
            if not done:
                continue
            best = self._aggregate_metrics(task, done) or best
            if task.task_type == "train":
                trained = self._aggregate_trained(task, done)
                model.update(trained)

        def save() -> None:
            for task_name, optimizer in self._optimizers.items():
                optimizer.save(self.workdir / f"optimizer-{task_name}.npz")
            if best:
                self._save("best.pb", scored, closing)
            if (self.workdir / "last.pb").exists():
                (self.workdir / "last.pb").replace(self.workdir / "previous.pb")
            self._save("last.pb", model, closing + 1)

        try:
            if sum(v.nbytes for v in model.values()) <= INLINE_RESULT_BYTES:
                save()
            else:
                await asyncio.to_thread(save)
        except Exception as exc:  # a full disk, say: the experiment fails, not the director
            log.exception("experiment %s: closing round %d failed", self.name, closing)
            self._finish(f"closing round {closing} failed: {exc}")
            return
        if self.done:
            return
        self.previous, self.model, self.round = scored, model, closing + 1
        log.info("experiment %s round %d closed with %d collaborators (%s %s)", self.name,
                 closing, len(self._done), self.metric_name or "metric",
                 "n/a" if self.best_metric is None else f"best {self.best_metric:.4g}",
                 extra={"experiment": self.name, "round": closing})
        summary = self._summary()
        if self.round >= self.plan.rounds:
            self._finish(None, summary)
            return
        self.outcome.round_closed(self.name, round_number=self.round,
                                  total_rounds=self.plan.rounds, summary=summary)
        self._start_round()
        self._signal()

    def _summary(self) -> dict[str, str]:
        last = next((e.value for e in reversed(self.events)
                     if e.origin == AGGREGATOR and e.name == self.metric_name
                     and e.task == self._validate_agg_task()), None)
        return {"kind": "openfl", "metric": self.metric_name,
                "best_metric": "" if self.best_metric is None else f"{self.best_metric:.6g}",
                "last_metric": "" if last is None else f"{last:.6g}"}

    def _validate_agg_task(self) -> str:
        return next((t.name for t in self.plan.tasks
                     if t.task_type == "validate" and not t.apply_local), "")

    def _finish(self, error: str | None, summary: dict[str, str] | None = None) -> None:
        if self.done:
            return
        self.done, self.error = True, error
        if error is None:
            self.outcome.round_closed(self.name, round_number=self.round,
                                      total_rounds=self.plan.rounds,
                                      summary=summary or self._summary())
        self.outcome.experiment_done(self.name, error=error)
        self._signal()

    def review(self, shard: str, decision: str, reason: str) -> None:
        """A shard's decision: awaiting holds the rounds, refused leaves it out for good
        (failing the experiment when no collaborator, or fewer than the straggler policy's
        minimum, is left)."""
        if self.done or shard not in self.collaborators:
            return
        if self.shard_review.take(self.collaborators, shard, decision, reason):
            self._results.pop(shard, None)
            if shard in self._done:
                self._done.remove(shard)
            error = self.shard_review.failure(len(self.collaborators),
                                              max(1, self.plan.straggler.minimum_reporting))
            if error is not None:
                self._finish(error)
                return
            if self._done and self._round_can_end() and not self._closing:
                task = asyncio.get_running_loop().create_task(self._end_round_when_free())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        if decision != "awaiting":
            self._signal()

    def fail(self, error: str) -> None:
        self._finish(error)

    def stop(self) -> None:
        if not self.done:
            self.done = True
            self._signal()
