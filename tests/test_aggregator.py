"""The aggregator's receive path for model-sized results: the sender's reply comes once
its result is checked, the FedAvg update that follows still holds the round, the round
closes off the event loop, and a result sent again is acknowledged, not added."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from fedkube.aggregator.experiment import ROUND_TRANSITIONS, ExperimentAggregator, RoundPhase
from fedkube.aggregator.fedavg import Model, StreamingFedAvg
from fedkube.api.errors import InternalError, InvalidArgumentError
from fedkube.api.plan import Plan
from fedkube.proto import aggregator_pb2, base_pb2
from fedkube.transport.tensors import model_from_proto, to_named_tensor
from tests.helpers import eventually

SIZE = 1 << 20  # 4 MiB of float32: past the inline limit, so checked and added in threads


class Recorder:
    def __init__(self) -> None:
        self.closed: list[int] = []

    def round_closed(self, name: str, *, round_number: int, total_rounds: int,
                     summary: dict[str, str]) -> None:
        self.closed.append(round_number)

    def experiment_done(self, name: str, *, error: str | None) -> None:
        pass


def two_round_aggregator(workdir: Path, outcome: Recorder, now: list[float],
                         collaborators: list[str], min_collaborators: int | None = None
                         ) -> ExperimentAggregator:
    """An aggregator of a SIZE model, 2 rounds timing out after 1 s of the clock `now`."""
    return ExperimentAggregator(
        name="exp", plan=Plan(task="digits-logreg", rounds=2, round_timeout_s=1.0,
                              min_collaborators=min_collaborators),
        collaborators=collaborators, initial={"w": np.zeros(SIZE, np.float32)},
        workdir=workdir, outcome=outcome, clock=lambda: now[0])


def _train(sender: str, value: float, samples: int) -> aggregator_pb2.TaskResults:
    return aggregator_pb2.TaskResults(
        header=aggregator_pb2.MessageHeader(sender=sender, federation_uuid="exp"),
        round_number=0, task_name="train", data_size=samples,
        tensors=[to_named_tensor("w", np.full(SIZE, value, np.float32))])


class GatedFedAvg(StreamingFedAvg):
    """The real FedAvg, whose add waits for the test to open a gate."""

    gate = threading.Event()

    def add(self, update: Model, weight: float) -> None:
        assert self.gate.wait(timeout=30)
        super().add(update, weight)


async def test_reply_comes_before_the_add_which_still_holds_the_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedkube.aggregator.experiment.StreamingFedAvg", GatedFedAvg)
    GatedFedAvg.gate.clear()
    now = [0.0]
    outcome = Recorder()
    aggregator = two_round_aggregator(tmp_path, outcome, now, ["a", "b"])
    aggregator.get_tasks("a")  # starts the round's clock

    # The reply to "a" comes while its add is still blocked...
    await asyncio.wait_for(aggregator.receive("a", _train("a", 1.0, 30)), timeout=5)
    # ...and from then on its task is done: no second training task, a replay refused.
    assert "train" not in aggregator.tasks_for("a")
    with pytest.raises(InvalidArgumentError, match="no pending 'train' task"):
        aggregator._check_results("a", _train("a", 1.0, 30))
    # The round cannot close under the pending add, even past its timeout.
    now[0] = 60.0
    aggregator.tick()
    assert outcome.closed == [] and not aggregator.done

    # "b" waits its turn behind the add; once the gate opens both are summed, weighted.
    now[0] = 0.5
    second = asyncio.create_task(aggregator.receive("b", _train("b", 4.0, 10)))
    GatedFedAvg.gate.set()
    await asyncio.wait_for(second, timeout=30)
    await asyncio.wait_for(asyncio.gather(*aggregator._background), timeout=30)
    assert outcome.closed == [1]
    np.testing.assert_allclose(aggregator.model["w"], np.full(SIZE, (30 + 40) / 40, np.float32))


def _validate(sender: str, accuracy: float, round_number: int = 0
              ) -> aggregator_pb2.TaskResults:
    return aggregator_pb2.TaskResults(
        header=aggregator_pb2.MessageHeader(sender=sender, federation_uuid="exp"),
        round_number=round_number, task_name="validate", data_size=10,
        tensors=[to_named_tensor("accuracy", np.array([accuracy]), report=True)])


async def test_a_result_sent_again_is_acknowledged_and_ignored_but_a_late_one_refused(
        tmp_path: Path) -> None:
    """A retried upload whose reply was lost must neither fail its collaborator nor count
    twice, in its round or after its result closed that round; a straggler's result for
    a closed round is still refused."""
    now = [0.0]
    outcome = Recorder()
    aggregator = two_round_aggregator(tmp_path, outcome, now, ["a", "b", "c"],
                                      min_collaborators=2)
    aggregator.get_tasks("a")
    await aggregator.receive("a", _validate("a", 0.5))
    await aggregator.receive("a", _validate("a", 0.9))  # again, other figures: ignored
    await aggregator.receive("a", _train("a", 1.0, 10))
    await aggregator.receive("a", _train("a", 50.0, 10))  # again while being added
    await aggregator.receive("b", _train("b", 3.0, 10))
    await asyncio.wait_for(asyncio.gather(*aggregator._background), timeout=30)
    assert aggregator._fedavg.count == 2 and aggregator._validated == {"a": (0.5, 10.0)}
    now[0] = 5.0
    aggregator.tick()  # past the timeout on quorum: closes without c, off the loop
    await asyncio.wait_for(asyncio.gather(*aggregator._background), timeout=30)
    assert outcome.closed == [1]
    np.testing.assert_allclose(aggregator.model["w"], np.full(SIZE, 2.0, np.float32))
    # Sent again after the round it belonged to closed: still acknowledged, not added.
    await aggregator.receive("b", _train("b", 9.0, 10))
    await aggregator.receive("a", _validate("a", 0.1))
    assert aggregator._fedavg.count == 0 and aggregator.round == 1
    # c never sent round 0's result: that one is late, not a repeat.
    with pytest.raises(InvalidArgumentError, match="round 0 is closed"):
        await aggregator.receive("c", _train("c", 1.0, 10))
    np.testing.assert_allclose(aggregator.model["w"], np.full(SIZE, 2.0, np.float32))
    assert [e.value for e in aggregator.events if e.task == "aggregated_validate"] == [0.5]


class GatedClose(StreamingFedAvg):
    """The real FedAvg, whose average (the first step of a round's close) waits for the
    test to open a gate."""

    gate = threading.Event()

    def result(self) -> Model:
        assert self.gate.wait(timeout=30)
        return super().result()


async def test_a_round_closes_off_the_event_loop_and_takes_nothing_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the average and the saves run (seconds for a large model), the loop answers:
    were they on it, this test could not go on until the gate's timeout."""
    monkeypatch.setattr("fedkube.aggregator.experiment.StreamingFedAvg", GatedClose)
    GatedClose.gate.clear()
    now = [0.0]
    outcome = Recorder()
    aggregator = two_round_aggregator(tmp_path, outcome, now, ["a", "b"])
    aggregator.get_tasks("a")
    await aggregator.receive("a", _train("a", 1.0, 10))
    await aggregator.receive("b", _train("b", 3.0, 10))  # the last one: the round closes
    await eventually(lambda: aggregator.phase is RoundPhase.CLOSING, within=30,
                     message="the close to start")

    # Meanwhile: no tasks, the closing round's model still served, a timeout closes
    # nothing twice, a result for the round refused.
    assert aggregator.get_tasks("a").tasks == [] and aggregator.round == 0
    np.testing.assert_array_equal(aggregator.tensor_values("a", "w", 0), np.zeros(SIZE))
    now[0] = 60.0
    aggregator.tick()
    assert len(aggregator._background) == 1 and outcome.closed == []

    GatedClose.gate.set()
    await asyncio.wait_for(asyncio.gather(*aggregator._background), timeout=30)
    assert outcome.closed == [1] and aggregator.round == 1
    np.testing.assert_allclose(aggregator.model["w"], np.full(SIZE, 2.0, np.float32))
    assert [t.name for t in aggregator.get_tasks("a").tasks] == ["validate", "train"]
    # last.pb holds m_1, for a restarted director to resume from.
    saved = model_from_proto(base_pb2.ModelProto.FromString(
        (tmp_path / "last.pb").read_bytes()))
    np.testing.assert_allclose(saved["w"], np.full(SIZE, 2.0, np.float32))


def test_round_phases_move_only_along_the_table(tmp_path: Path) -> None:
    assert ROUND_TRANSITIONS[RoundPhase.OVER] == frozenset()
    assert set(ROUND_TRANSITIONS) == set(RoundPhase)
    aggregator = two_round_aggregator(tmp_path, Recorder(), [0.0], ["a"])
    assert (aggregator.phase, aggregator.done) == (RoundPhase.OPEN, False)  # not narrowed
    aggregator.stop()  # the director ended it: over, without a report
    assert aggregator.phase is RoundPhase.OVER and aggregator.done
    assert aggregator.error is None and aggregator.tasks_for("a") == []
    assert aggregator.get_tasks("a").quit
    aggregator.stop()  # a second stop changes nothing
    with pytest.raises(InternalError, match="no move from over to open"):
        aggregator._enter(RoundPhase.OPEN)
    with pytest.raises(InvalidArgumentError, match="is over"):
        aggregator._check_results("a", _train("a", 1.0, 30))
