"""Round latency: what the director adds to a round, beside the bare gRPC calls it needs.

One asyncio client plays K collaborators with a trivial task (no compute: the update is
the model it fetched) against a real director process, for R rounds of `digits-logreg`
(a 2.6 KB model). Per round each collaborator calls GetTasks, GetAggregatedTensor for
each tensor, and SendLocalTaskResults twice (validation metrics, then the update).

- **turnover**: the last update's SendLocalTaskResults, from the call to the reply, minus
  the median of the other updates' calls: the cost of closing the round (FedAvg result,
  saving `last.pb`, scoring, persisting the round) on top of taking a result.
- **round**: from the first GetTasks that hands out round r to the last reply of round r.
- **raw gRPC**: the same calls, same payload sizes, same client, against a grpc.aio server
  whose handlers only return canned bytes: the transport's floor. The round **overhead**
  is fedkube's round minus the raw round.

    python -m benchmarks.round_latency --collaborators 8,32 --rounds 20 [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from benchmarks.report import console, emit
from fedkube.api.plan import Plan
from fedkube.client import DirectorClient, experiment_archive
from fedkube.dev.processes import free_port, port_open, wait_for
from fedkube.proto import aggregator_pb2, base_pb2, director_pb2
from fedkube.transport.limits import CHUNK_BYTES, GRPC_OPTIONS
from fedkube.transport.tensors import chunk_message, metric_tensors, to_named_tensor

POLL_S = 0.002  # a waiting collaborator asks again this soon (the CLI's is 100 ms)
DIRECTOR = "/openfl.director.Director/"
AGGREGATOR = "/openfl.aggregator.Aggregator/"


@dataclass
class Result:
    target: str
    collaborators: int
    rounds: int
    round_ms_p50: float
    round_ms_p95: float
    turnover_ms_p50: float
    result_call_ms_p50: float


def _identity(data: bytes) -> bytes:
    return data


class Calls:
    """The four calls a collaborator makes, over one channel, as raw bytes."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        codec: dict[str, Any] = {"request_serializer": _identity,
                                 "response_deserializer": _identity}
        self.get_tasks = channel.unary_unary(AGGREGATOR + "GetTasks", **codec)
        self.get_tensor = channel.unary_unary(AGGREGATOR + "GetAggregatedTensor", **codec)
        self.send = channel.stream_unary(AGGREGATOR + "SendLocalTaskResults", **codec)


async def _stream(data: bytes) -> AsyncIterator[bytes]:
    for chunk in chunk_message(data, CHUNK_BYTES):
        yield chunk.SerializeToString()


@dataclass
class Timeline:
    round_start: dict[int, float]
    round_end: dict[int, float]
    last_send_ms: dict[int, float]
    other_send_ms: list[float]


async def play(address: str, experiment: str, names: list[str], tensors: dict[str, bytes],
               rounds: int, parse: bool) -> Timeline:
    """K collaborators against the aggregator at address. With parse=False (the raw
    server) every reply is taken as given and rounds are counted by the client."""
    timeline = Timeline({}, {}, {}, [])
    done_in_round: dict[int, int] = {}
    barriers: dict[int, asyncio.Event] = {}
    channels = [grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) for _ in range(4)]
    try:
        async def collaborator(index: int, name: str) -> None:
            calls = Calls(channels[index % len(channels)])
            header = aggregator_pb2.MessageHeader(sender=name, receiver="aggregator",
                                                  federation_uuid=experiment)
            request = aggregator_pb2.GetTasksRequest(header=header).SerializeToString()
            r = 0
            while r < rounds:
                reply = aggregator_pb2.GetTasksResponse.FromString(
                    await calls.get_tasks(request))
                if parse and reply.quit:
                    return
                if parse and (not reply.tasks or reply.round_number < r):
                    await asyncio.sleep(POLL_S)
                    continue
                r = reply.round_number if parse else r
                timeline.round_start.setdefault(r, time.perf_counter())
                update = []
                for tensor_name, payload in tensors.items():
                    data = await calls.get_tensor(aggregator_pb2.GetAggregatedTensorRequest(
                        header=header, tensor_name=tensor_name,
                        round_number=r).SerializeToString())
                    if parse:
                        got = aggregator_pb2.GetAggregatedTensorResponse.FromString(data)
                        update.append(got.tensor)
                    else:
                        update.append(base_pb2.NamedTensor.FromString(payload))
                validate = aggregator_pb2.TaskResults(
                    header=header, round_number=r, task_name="validate", data_size=10,
                    tensors=list(metric_tensors({"accuracy": 0.5}, r)))
                await calls.send(_stream(validate.SerializeToString()))
                train = aggregator_pb2.TaskResults(header=header, round_number=r,
                                                   task_name="train", data_size=10,
                                                   tensors=update)
                started = time.perf_counter()
                await calls.send(_stream(train.SerializeToString()))
                ended = time.perf_counter()
                done_in_round[r] = done_in_round.get(r, 0) + 1
                everyone = barriers.setdefault(r, asyncio.Event())
                if done_in_round[r] == len(names):
                    timeline.last_send_ms[r] = (ended - started) * 1e3
                    timeline.round_end[r] = ended
                    everyone.set()
                else:
                    timeline.other_send_ms.append((ended - started) * 1e3)
                    if not parse:
                        # The raw server has no rounds: the others are awaited as a
                        # barrier, released at once (fedkube's collaborators poll).
                        await everyone.wait()
                r += 1

        await asyncio.gather(*(collaborator(i, n) for i, n in enumerate(names)))
    finally:
        for channel in channels:
            await channel.close(None)
    return timeline


def summarize(target: str, k: int, timeline: Timeline, skip: int = 2) -> Result:
    rounds = sorted(r for r in timeline.round_end if r >= skip and r in timeline.round_start)
    durations = [(timeline.round_end[r] - timeline.round_start[r]) * 1e3 for r in rounds]
    turnover = [timeline.last_send_ms[r] for r in rounds]
    other = statistics.median(timeline.other_send_ms) if timeline.other_send_ms else 0.0
    return Result(target=target, collaborators=k, rounds=len(rounds),
                  round_ms_p50=statistics.median(durations),
                  round_ms_p95=sorted(durations)[int(0.95 * (len(durations) - 1))],
                  turnover_ms_p50=statistics.median(turnover) - other,
                  result_call_ms_p50=other)


# -- fedkube --------------------------------------------------------------------------------

def run_fedkube(k: int, rounds: int, work: Path) -> Result:
    port = free_port()
    director = subprocess.Popen(
        [sys.executable, "-m", "fedkube.cli", "--log-level", "warning", "director", "start",
         "--insecure", "--host", "127.0.0.1", "--port", str(port), "--data-dir",
         str(work / f"director-{k}"), "--health-check-period", "600"],
        stdout=subprocess.DEVNULL, stderr=(work / f"director-{k}.log").open("wb"))
    try:
        wait_for(lambda: port_open(port), timeout=60, message="director")
        names = [f"c{i:03d}" for i in range(k)]
        channel = grpc.insecure_channel(f"localhost:{port}")
        register = channel.unary_unary(DIRECTOR + "UpdateShardInfo", None, None)  # bytes
        for name in names:
            register(director_pb2.UpdateShardInfoRequest(shard_info=director_pb2.ShardInfo(
                node_info=director_pb2.NodeInfo(name=name), n_samples=10,
                sample_shape=["8", "8"], target_shape=["1"])).SerializeToString())
        channel.close()
        plan = Plan(task="digits-logreg", rounds=rounds + 1, round_timeout_s=600)
        archive, initial = experiment_archive(plan)
        with DirectorClient(f"localhost:{port}", client_id="bench") as client:
            client.submit("latency", archive, collaborators=names, initial_model=initial)
        tensors = {t.name: t.SerializeToString() for t in initial.tensors}
        timeline = asyncio.run(play(f"localhost:{port}", "latency", names, tensors,
                                    rounds, parse=True))
        return summarize("fedkube", k, timeline)
    finally:
        director.terminate()
        director.wait(timeout=30)


# -- raw gRPC ---------------------------------------------------------------------------------

def serve_raw(port: int, tensor_replies: dict[str, bytes]) -> None:
    """Canned replies of the real sizes; requests are read and dropped."""
    tasks = aggregator_pb2.GetTasksResponse(tasks=[
        aggregator_pb2.Task(name="validate"), aggregator_pb2.Task(name="train")]
    ).SerializeToString()
    replies = {name: aggregator_pb2.GetAggregatedTensorResponse(
        tensor=base_pb2.NamedTensor.FromString(data)).SerializeToString()
        for name, data in tensor_replies.items()}

    async def get_tasks(request: bytes, context: Any) -> bytes:
        return tasks

    async def get_tensor(request: bytes, context: Any) -> bytes:
        name = aggregator_pb2.GetAggregatedTensorRequest.FromString(request).tensor_name
        return replies[name]

    async def send(requests: AsyncIterator[bytes], context: Any) -> bytes:
        async for _ in requests:
            pass
        return b""

    async def main() -> None:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "GetTasks": grpc.unary_unary_rpc_method_handler(get_tasks),
            "GetAggregatedTensor": grpc.unary_unary_rpc_method_handler(get_tensor),
            "SendLocalTaskResults": grpc.stream_unary_rpc_method_handler(send)}
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "openfl.aggregator.Aggregator", handlers)])
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def run_raw(k: int, rounds: int, work: Path) -> Result:
    from fedkube.tasks.models import logreg_init

    tensors = {n: to_named_tensor(n, v).SerializeToString()
               for n, v in logreg_init({}).items()}
    (work / "tensors.json").write_text(json.dumps({n: d.hex() for n, d in tensors.items()}))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.round_latency",
                               "--serve-raw", str(port), "--tensors",
                               str(work / "tensors.json")])
    try:
        wait_for(lambda: port_open(port), timeout=60, message="raw server")
        names = [f"c{i:03d}" for i in range(k)]
        timeline = asyncio.run(play(f"localhost:{port}", "latency", names, tensors, rounds,
                                    parse=False))
        return summarize("raw gRPC", k, timeline)
    finally:
        server.terminate()
        server.wait(timeout=30)


def table(results: list[Result], as_json: bool = False) -> None:
    from rich.table import Table

    view = Table(title="Round latency, trivial task (2.6 KB model): fedkube vs raw gRPC")
    for column in ("collaborators", "target", "rounds", "round p50 ms", "round p95 ms",
                   "overhead p50 ms", "turnover ms", "result call ms"):
        view.add_column(column, justify="left" if column == "target" else "right")
    raw = {r.collaborators: r for r in results if r.target == "raw gRPC"}
    for r in results:
        floor = raw.get(r.collaborators)
        overhead = (f"{r.round_ms_p50 - floor.round_ms_p50:.1f}"
                    if floor and r.target == "fedkube" else "")
        view.add_row(str(r.collaborators), r.target, str(r.rounds), f"{r.round_ms_p50:.1f}",
                     f"{r.round_ms_p95:.1f}", overhead,
                     f"{r.turnover_ms_p50:.2f}" if r.target == "fedkube" else "",
                     f"{r.result_call_ms_p50:.2f}")
    console(as_json).print(view)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--collaborators", default="8,32")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve-raw", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tensors", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_raw:
        tensors = {n: bytes.fromhex(d) for n, d in json.loads(args.tensors.read_text()).items()}
        serve_raw(args.serve_raw, tensors)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="fedkube-rounds-") as tmp:
        for k in (int(v) for v in args.collaborators.split(",")):
            results.append(run_raw(k, args.rounds, Path(tmp)))
            results.append(run_fedkube(k, args.rounds, Path(tmp)))
    table(results, args.json)
    if args.json:
        emit("round_latency", [asdict(r) for r in results])


if __name__ == "__main__":
    main()
