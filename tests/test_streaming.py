"""The streamed tensor download (fedkube's extension RPC) and the collaborator's fallback
to OpenFL's GetAggregatedTensor, on real servers on loopback."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedkube.aggregator.runner import AggregatorRunner
from fedkube.aggregator.servicer import AggregatorService, add_aggregator_to_server
from fedkube.api.plan import Plan
from fedkube.client import experiment_archive
from fedkube.collaborator.run import Collaborator
from fedkube.proto import aggregator_pb2_grpc
from fedkube.tasks.digits import DigitsShard
from fedkube.tasks.models import BUILTIN_TASKS
from fedkube.transport import metrics
from fedkube.transport.tensors import model_to_proto


class Recorder:
    def round_closed(self, name: str, *, round_number: int, total_rounds: int,
                     summary: dict[str, str]) -> None:
        pass

    def experiment_done(self, name: str, *, error: str | None) -> None:
        pass


@dataclass(frozen=True)
class Started:
    name: str
    archive_path: str
    collaborators: tuple[str, ...] = ("env1",)
    current_round: int = 0
    extra: dict[str, str] = field(default_factory=dict)


@pytest.mark.parametrize("streaming", [True, False])
async def test_collaborator_fetches_the_model_streamed_or_as_openfl_sends_it(
        tmp_path: Path, streaming: bool) -> None:
    plan = Plan(task="digits-logreg", rounds=2)
    archive, _ = experiment_archive(plan)
    (tmp_path / "archive.zip").write_bytes(archive)
    rng = np.random.default_rng(0)
    initial = {"weights": rng.standard_normal((64, 10)).astype(np.float32),
               "bias": rng.standard_normal(10).astype(np.float32)}
    (tmp_path / "initial_model.pb").write_bytes(model_to_proto(initial).SerializeToString())
    runner = AggregatorRunner(Recorder())
    runner.start(Started("exp", str(tmp_path / "archive.zip")))
    server = grpc.aio.server()
    service = AggregatorService(runner, tls=False)
    if streaming:  # as fedkube's director serves it
        add_aggregator_to_server(service, server)
    else:  # an OpenFL 1.6 director: the Aggregator service only
        aggregator_pb2_grpc.add_AggregatorServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sent = metrics.BYTES_SENT.labels("StreamAggregatedTensor")._value.get()
    collaborator = Collaborator(target=f"localhost:{port}", experiment="exp", name="env1",
                                plan=plan, task=BUILTIN_TASKS["digits-logreg"],
                                shard=DigitsShard(0, 2))
    try:
        model = await asyncio.to_thread(collaborator.fetch_model, 0)
        assert collaborator._streaming is streaming
        for name, values in initial.items():
            np.testing.assert_array_equal(model[name], values)
        streamed = metrics.BYTES_SENT.labels("StreamAggregatedTensor")._value.get() - sent
        assert streamed >= (640 + 10) * 4 if streaming else streamed == 0
        # A second round's fetch reuses the same receive buffers.
        again = await asyncio.to_thread(collaborator.fetch_model, 0)
        np.testing.assert_array_equal(again["weights"], initial["weights"])
    finally:
        collaborator.close()
        runner.stop("exp")
        await server.stop(None)
