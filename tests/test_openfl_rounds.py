"""OpenFL 1.6's round semantics on fedkube's aggregator (fedkube.aggregator.openfl_rounds),
driven call by call with the messages OpenFL's collaborator sends, on a clock of the
test's own: straggler policies, late and repeated results, deltas, aggregation functions,
the best model. The end-to-end runs with OpenFL itself are in tests/test_openfl_on_fedkube.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from fedkube.aggregator.openfl_rounds import OpenFLRounds, geometric_median
from fedkube.api.errors import UnauthenticatedError
from fedkube.openfl.workspace import OpenFLPlan, OpenFLTask, StragglerPolicy
from fedkube.proto import aggregator_pb2, base_pb2
from fedkube.transport.status import STATUS_CODES
from fedkube.transport.tensors import from_named_tensor, model_from_proto, to_named_tensor
from tests.helpers import eventually

TASKS = (OpenFLTask("train", "fit", "train"),
         OpenFLTask("locally_tuned_model_validate", "score", "validate", apply_local=True),
         OpenFLTask("aggregated_model_validate", "score", "validate"))


class Outcome:
    def __init__(self) -> None:
        self.closed: list[tuple[int, dict[str, str]]] = []
        self.done: list[str | None] = []

    def round_closed(self, name: str, *, round_number: int, total_rounds: int,
                     summary: dict[str, str]) -> None:
        self.closed.append((round_number, summary))

    def experiment_done(self, name: str, *, error: str | None) -> None:
        self.done.append(error)


def rounds(tmp_path: Path, *, collaborators: Sequence[str] = ("a", "b", "c"),
           aggregation: str = "weighted_average", straggler: StragglerPolicy | None = None,
           total: int = 2, now: list[float] | None = None) -> tuple[OpenFLRounds, Outcome]:
    outcome, clock = Outcome(), now if now is not None else [0.0]
    plan = OpenFLPlan(rounds=total, tasks=TASKS,
                      aggregation={t.name: aggregation for t in TASKS},
                      straggler=straggler or StragglerPolicy())
    return OpenFLRounds(name="exp", plan=plan, collaborators=list(collaborators),
                        initial={"w": np.zeros(3, np.float32)}, workdir=tmp_path,
                        outcome=outcome, clock=lambda: clock[0]), outcome


def tensor(name: str, value: npt.ArrayLike, *tags: str, report: bool = False,
           round_number: int = 0) -> base_pb2.NamedTensor:
    """A tensor as OpenFL's collaborator sends it (NoCompressionPipeline: `compressed`)."""
    named = to_named_tensor(name, value, round_number=round_number, report=report)
    named.tags.extend([*tags, "compressed"])
    return named


def result(sender: str, task: str, *tensors: base_pb2.NamedTensor, size: int = 10,
           round_number: int = 0) -> aggregator_pb2.TaskResults:
    return aggregator_pb2.TaskResults(
        header=aggregator_pb2.MessageHeader(sender=sender), round_number=round_number,
        task_name=task, data_size=size, tensors=list(tensors))


async def all_tasks(aggregator: OpenFLRounds, sender: str, weights: npt.ArrayLike, accuracy: float,
                    *, size: int = 10, round_number: int = 0) -> None:
    """A collaborator's three results of a round, in OpenFL's order."""
    await aggregator.receive(sender, result(
        sender, "train", tensor("w", weights, "trained", round_number=round_number),
        tensor("loss", 1.0, "trained", "metric", report=True, round_number=round_number),
        size=size, round_number=round_number))
    await all_tasks_but_train(aggregator, sender, accuracy, round_number=round_number,
                              size=size)


async def all_tasks_but_train(aggregator: OpenFLRounds, sender: str, accuracy: float, *,
                              round_number: int = 0, size: int = 10) -> None:
    for task, tag in (("locally_tuned_model_validate", "validate_local"),
                      ("aggregated_model_validate", "validate_agg")):
        await aggregator.receive(sender, result(
            sender, task, tensor("accuracy", accuracy, tag, "metric", report=True,
                                 round_number=round_number),
            size=size, round_number=round_number))


def saved(tmp_path: Path, filename: str) -> np.ndarray:
    return model_from_proto(base_pb2.ModelProto.FromString(
        (tmp_path / filename).read_bytes()))["w"]


async def test_tasks_are_the_plans_with_function_names_and_apply_local(tmp_path: Path) -> None:
    aggregator, _ = rounds(tmp_path)
    reply = aggregator.get_tasks("a")
    assert [(t.name, t.function_name, t.task_type, t.apply_local) for t in reply.tasks] == [
        ("train", "fit", "train", False),
        ("locally_tuned_model_validate", "score", "validate", True),
        ("aggregated_model_validate", "score", "validate", False)]
    with pytest.raises(UnauthenticatedError):  # OpenFL's client stops on it
        aggregator.get_tasks("stranger")
    assert STATUS_CODES[UnauthenticatedError] == grpc.StatusCode.UNAUTHENTICATED


async def test_a_round_is_the_weighted_average_of_done_collaborators(tmp_path: Path) -> None:
    aggregator, outcome = rounds(tmp_path, collaborators=("a", "b"))
    await all_tasks(aggregator, "a", [1.0, 1.0, 1.0], 0.5, size=30)
    assert aggregator.round == 0  # b not done: the round waits (no cut-off)
    await all_tasks(aggregator, "b", [5.0, 5.0, 5.0], 0.7, size=10)
    assert aggregator.round == 1
    np.testing.assert_allclose(aggregator.model["w"], [2.0, 2.0, 2.0])
    np.testing.assert_allclose(saved(tmp_path, "last.pb"), [2.0, 2.0, 2.0])
    figures = {(e.origin, e.task, e.name): e.value for e in aggregator.events}
    assert figures[("aggregator", "aggregated_model_validate", "accuracy")] == pytest.approx(
        0.5 * 0.75 + 0.7 * 0.25)
    assert outcome.closed[-1][1]["metric"] == "accuracy"


async def test_the_model_and_its_delta_come_back_tagged_as_openfl_decodes_them(
        tmp_path: Path) -> None:
    aggregator, _ = rounds(tmp_path, collaborators=("a",))
    model = aggregator.get_tensor("a", "w", 0, tags=("model",), require_lossless=True)
    assert (set(model.tags), model.lossless, model.round_number) == (
        {"model", "compressed"}, True, 0)
    await all_tasks(aggregator, "a", [4.0, 4.0, 4.0], 0.5)
    delta = aggregator.get_tensor("a", "w", 1, tags=("aggregated", "delta", "compressed"))
    assert set(delta.tags) == {"aggregated", "delta", "compressed"}
    np.testing.assert_allclose(from_named_tensor(delta), [4.0, 4.0, 4.0])
    # A trained delta (delta_updates) is added to the round's model.
    await aggregator.receive("a", result(
        "a", "train", tensor("w", [1.0, 1.0, 1.0], "trained", "delta", round_number=1),
        round_number=1))
    await all_tasks_but_train(aggregator, "a", 0.5, round_number=1)
    np.testing.assert_allclose(saved(tmp_path, "last.pb"), [5.0, 5.0, 5.0])


async def test_late_repeated_and_straggler_results_are_acknowledged_and_ignored(
        tmp_path: Path) -> None:
    now = [0.0]
    aggregator, _ = rounds(tmp_path, collaborators=("a", "b"), now=now, straggler=(
        StragglerPolicy("cutoff_time", cutoff_s=10.0, minimum_reporting=1)))
    aggregator.get_tasks("a")  # the cut-off clock starts with the first tasks out
    await all_tasks(aggregator, "a", [2.0, 2.0, 2.0], 0.5)
    await aggregator.receive("a", result("a", "train", tensor("w", [9.0] * 3, "trained")))
    assert aggregator.round == 0  # the repeat changed nothing; b is not done
    now[0] = 11.0
    aggregator.tick()  # past the cut-off with a done: the round ends without b
    await eventually(lambda: aggregator.round == 1, within=5, message="round 0 closed")
    np.testing.assert_allclose(aggregator.model["w"], [2.0, 2.0, 2.0])  # a alone
    # b's result for the closed round is ignored, not an error (OpenFL's client would
    # retry an error forever).
    await aggregator.receive("b", result("b", "train", tensor("w", [7.0] * 3, "trained")))
    np.testing.assert_allclose(aggregator.model["w"], [2.0, 2.0, 2.0])


async def test_a_percentage_policy_ends_the_round_without_the_rest(tmp_path: Path) -> None:
    aggregator, _ = rounds(tmp_path, straggler=StragglerPolicy("percentage", percent=0.6))
    await all_tasks(aggregator, "a", [1.0, 1.0, 1.0], 0.5)
    assert aggregator.round == 0
    await all_tasks(aggregator, "b", [3.0, 3.0, 3.0], 0.5)
    assert aggregator.round == 1  # 2 of 3 >= 60 %
    assert aggregator.get_tasks("c").tasks  # c gets the next round's tasks


@pytest.mark.parametrize(("aggregation", "expected"), [
    ("median", [2.0, 2.0, 2.0]),
    ("geometric_median", None),
])
async def test_stacked_aggregations(tmp_path: Path, aggregation: str,
                                    expected: list[float] | None) -> None:
    aggregator, _ = rounds(tmp_path, aggregation=aggregation)
    for sender, value in (("a", 1.0), ("b", 2.0), ("c", 30.0)):
        await all_tasks(aggregator, sender, [value] * 3, 0.5)
    if expected is None:  # Weiszfeld's estimate: near the two close points, not the mean
        stack = [np.full(3, v, np.float32) for v in (1.0, 2.0, 30.0)]
        expected = list(geometric_median(stack, [10, 10, 10]))
        assert expected[0] < 11.0
    np.testing.assert_allclose(aggregator.model["w"], expected, rtol=1e-6)


async def test_the_best_model_is_the_validated_one_and_the_experiment_ends(
        tmp_path: Path) -> None:
    aggregator, outcome = rounds(tmp_path, collaborators=("a",), total=2)
    await all_tasks(aggregator, "a", [1.0, 1.0, 1.0], 0.6)  # validates the zero model
    await all_tasks(aggregator, "a", [2.0, 2.0, 2.0], 0.4, round_number=1)
    np.testing.assert_allclose(saved(tmp_path, "best.pb"), [0.0, 0.0, 0.0])  # 0.6 > 0.4
    np.testing.assert_allclose(saved(tmp_path, "last.pb"), [2.0, 2.0, 2.0])
    assert aggregator.done and outcome.done == [None]
    assert aggregator.get_tasks("a").quit
    assert outcome.closed[-1][1]["best_metric"] == "0.6"


async def test_bad_tensors_are_refused_with_a_reason(tmp_path: Path) -> None:
    from fedkube.api.errors import InvalidArgumentError

    aggregator, _ = rounds(tmp_path)
    raw = to_named_tensor("w", [1.0, 1.0, 1.0])
    raw.tags.append("trained")  # not compressed: OpenFL's aggregator asserts on it
    with pytest.raises(InvalidArgumentError, match="not compressed"):
        await aggregator.receive("a", result("a", "train", raw))
    with pytest.raises(InvalidArgumentError, match="NaN or Inf"):
        await aggregator.receive("a", result("a", "train",
                                             tensor("w", [np.nan, 1.0, 1.0], "trained")))
    with pytest.raises(InvalidArgumentError, match="not in the model"):
        await aggregator.receive("a", result("a", "train", tensor("w", [1.0], "trained")))


async def test_a_waiting_collaborator_hears_of_the_next_round_at_once(tmp_path: Path) -> None:
    """OpenFL's `sleep_time` is whole seconds: told to sleep, a collaborator lost a second
    every round. A collaborator done with its round is answered when the next opens."""
    import asyncio

    aggregator, _ = rounds(tmp_path, collaborators=("a", "b"))
    await all_tasks(aggregator, "a", [1.0, 1.0, 1.0], 0.5)
    waiting = asyncio.create_task(aggregator.next_tasks("a", within=60))
    await all_tasks(aggregator, "b", [3.0, 3.0, 3.0], 0.5)  # wakes it up on its way
    reply = await asyncio.wait_for(waiting, 5)
    assert (reply.round_number, [t.name for t in reply.tasks]) == (1, [t.name for t in TASKS])
    # Nothing to do within the bound: told to sleep, as before.
    await all_tasks(aggregator, "a", [1.0, 1.0, 1.0], 0.5, round_number=1)
    reply = await aggregator.next_tasks("a", within=0.05)
    assert (list(reply.tasks), reply.sleep_time, reply.quit) == ([], 1, False)
