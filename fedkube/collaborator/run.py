"""A collaborator process: fetches tasks and the global model, trains on its shard,
sends results. Launched by its envoy (a subprocess or a Pod); a task that raises makes
the process exit non-zero, and the envoy reports the failure to the director.

Under mTLS it keeps its certificate current for experiments that outlive it: between
rounds it reads its certificate files again (a local collaborator shares its envoy's,
which the envoy renews) and, in a Pod that requested its own, requests a new one when
it is due; a changed certificate means a new channel and bulk client."""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from fedkube.api.config import TLSSettings
from fedkube.api.plan import Plan
from fedkube.proto import aggregator_pb2, aggregator_pb2_grpc, streaming_pb2, streaming_pb2_grpc
from fedkube.tasks.archive import read_plan, safe_extract
from fedkube.tasks.models import Model, Task
from fedkube.tasks.shard import ShardDescriptor
from fedkube.transport.bulk import BulkClient, target_host
from fedkube.transport.certs import renewal_delay
from fedkube.transport.channel import (
    open_sync_channel,
    raw_results_call,
    raw_tensor_call,
    raw_tensor_stream,
)
from fedkube.transport.limits import CHUNK_BYTES
from fedkube.transport.status import is_transient
from fedkube.transport.tensors import (
    StreamReceiver,
    chunk_frames,
    encode_task_results,
    metric_tensors,
    parse_tensor_response,
)
from fedkube.transport.tls import TLSFiles

log = logging.getLogger(__name__)
T = TypeVar("T")
RECONNECT_PATIENCE_S = 600.0
POLL_S = 0.1
BULK_RETRY_S = 60.0  # after a bulk transfer could not connect, gRPC streams this long
CERTIFICATE_CHECK_S = 30.0  # how often, at most, between rounds, the files are read again


@dataclass
class Collaborator:
    target: str
    experiment: str
    name: str
    plan: Plan
    task: Task
    shard: ShardDescriptor
    tls: TLSFiles | None = None
    # Where the certificate comes from, to read it again between rounds; and, for one
    # this collaborator requested itself, how to request the next.
    certificate_files: TLSSettings | None = None
    renew_certificate: Callable[[], None] | None = None
    certificate_check_s: float = CERTIFICATE_CHECK_S  # at most this often between rounds
    # The bulk port's client, where it is known beforehand; otherwise the director is asked.
    bulk: BulkClient | None = None

    def __post_init__(self) -> None:
        self._connect(self.bulk)
        self._streaming = True  # until a director (OpenFL's) answers UNIMPLEMENTED
        self._received = StreamReceiver()
        self._certificate_check_at = 0.0
        self._header = aggregator_pb2.MessageHeader(sender=self.name, receiver="aggregator",
                                                    federation_uuid=self.experiment)
        self._names = list(self.task.init_model(self.plan.params))

    def _connect(self, bulk: BulkClient | None = None) -> None:
        """A channel (and a bulk client, when next asked for, unless given) with the current
        TLS files."""
        self._channel = open_sync_channel(self.target, tls=self.tls,
                                          options=[("grpc.max_reconnect_backoff_ms", 2000)])
        self._stub = aggregator_pb2_grpc.AggregatorStub(self._channel)
        self._get_tensor = raw_tensor_call(self._channel)
        self._stream_tensor = raw_tensor_stream(self._channel)
        self._send_frames = raw_results_call(self._channel)
        self._tensor_stream_stub = streaming_pb2_grpc.TensorStreamStub(self._channel)
        self._bulk: BulkClient | None = bulk
        # When to ask the director where its bulk port is.
        self._bulk_ask_at = 0.0 if bulk is None else float("inf")

    def refresh_certificate(self) -> bool:
        """Between rounds: renews a due certificate this collaborator requested, reads the
        files again, and reconnects if they changed. Whether it reconnected."""
        if self.certificate_files is None or time.monotonic() < self._certificate_check_at:
            return False
        self._certificate_check_at = time.monotonic() + self.certificate_check_s
        if (self.renew_certificate is not None and self.tls is not None
                and renewal_delay(self.tls.cert) == 0):
            try:
                self.renew_certificate()
            except Exception as exc:  # the operator away, a denial: keep the current one
                log.error("could not renew the certificate of %s (%s); trying again in "
                          "%.0f s", self.name, exc, self.certificate_check_s)
        current = TLSFiles.load(self.certificate_files)
        if current == self.tls:
            return False
        if current is not None and not current.key_matches_certificate():
            self._certificate_check_at = 0.0  # caught mid-renewal: read again next time
            return False
        self.tls = current
        old = self._channel
        self._connect()
        old.close()
        log.info("collaborator %s reconnected with its renewed certificate", self.name,
                 extra={"experiment": self.experiment, "collaborator": self.name})
        return True

    def _call(self, fn: Any, request: Any) -> Any:
        """Calls the aggregator, riding out a director restart."""
        for attempt in Retrying(retry=retry_if_exception(is_transient), reraise=True,
                                wait=wait_exponential_jitter(multiplier=0.2, max=2.0),
                                stop=stop_after_delay(RECONNECT_PATIENCE_S)):
            with attempt:
                return fn(request, timeout=120)
        raise AssertionError("unreachable")

    def _bulk_client(self) -> BulkClient | None:
        """Where the director takes model-sized transfers over a plain socket (asked once,
        and again a while after a bulk transfer could not connect); None: use the gRPC
        streams."""
        if self._bulk is None and time.monotonic() >= self._bulk_ask_at:
            self._bulk_ask_at = float("inf")
            try:
                port = self._call(self._tensor_stream_stub.BulkEndpoint,
                                  streaming_pb2.BulkEndpointRequest()).port
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                port = 0  # an OpenFL director, or an older fedkube one
            self._bulk = BulkClient(target_host(self.target), port, tls=self.tls) if port \
                else None
        return self._bulk

    def _bulk_failed(self, exc: OSError) -> None:
        log.warning("bulk transfer to %s failed (%s); using gRPC streams for %g s",
                    self.target, exc, BULK_RETRY_S)
        self._bulk, self._bulk_ask_at = None, time.monotonic() + BULK_RETRY_S

    def fetch_model(self, round_number: int) -> Model:
        """The global model of a round. Over the bulk port or streamed, each tensor lands
        in a buffer reused round after round and the task gets a view of it (valid for
        this round: a task that keeps arrays across rounds copies them); otherwise, as
        OpenFL sends it."""
        model = {}
        for name in self._names:
            request = aggregator_pb2.GetAggregatedTensorRequest(
                header=self._header, tensor_name=name, round_number=round_number)
            bulk = self._bulk_client()
            if bulk is not None:
                try:
                    model[name] = parse_tensor_response(
                        bulk.download(name, request.SerializeToString()))[1]
                    continue
                except OSError as exc:  # not a refusal (BulkError): could not connect
                    self._bulk_failed(exc)
            if self._streaming:
                try:
                    view = self._call(lambda req, timeout, key=name: self._received.receive(
                        key, self._stream_tensor(req, timeout=timeout)), request)
                    model[name] = parse_tensor_response(view)[1]
                    continue
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    log.info("the director does not stream tensors; using "
                             "GetAggregatedTensor")
                    self._streaming = False
            reply = self._call(self._get_tensor, request)
            # A view of the reply's bytes, copied once so tasks may change it in place.
            model[name] = parse_tensor_response(reply)[1].copy()
        return model

    def send(self, round_number: int, task: str, data_size: int, tensors: list[Any],
             arrays: Sequence[tuple[str, Any]] = ()) -> None:
        """Sends results: small tensors as messages, model arrays straight from memory."""
        results = aggregator_pb2.TaskResults(header=self._header, round_number=round_number,
                                             task_name=task, data_size=data_size,
                                             tensors=tensors)
        segments = encode_task_results(results, arrays)
        bulk = self._bulk_client() if arrays else None
        if bulk is not None:
            try:
                bulk.upload(self._header.SerializeToString(), segments)
                return
            except OSError as exc:  # not a refusal (BulkError): could not connect
                self._bulk_failed(exc)
        self._call(lambda _, timeout: self._send_frames(
            chunk_frames(segments, CHUNK_BYTES), timeout=timeout), None)

    def run(self) -> int:
        """Works until the aggregator says quit; returns the number of rounds trained."""
        trained = 0
        while True:
            self.refresh_certificate()
            response = self._call(self._stub.GetTasks,
                                  aggregator_pb2.GetTasksRequest(header=self._header))
            if response.quit:
                log.info("experiment %s over after %d rounds trained here", self.experiment,
                         trained)
                return trained
            if not response.tasks:
                # The others are still on this round. OpenFL sleeps whole seconds here;
                # asking again every 100 ms costs little and ends rounds sooner.
                time.sleep(POLL_S)
                continue
            r = response.round_number
            try:
                trained += self._work(r, [task.name for task in response.tasks])
            except grpc.RpcError as exc:
                if not self._round_moved_on(r, exc):
                    raise
                log.warning("round %d closed without this collaborator (%s); moving on",
                            r, exc.details(),
                            extra={"experiment": self.experiment, "round": r,
                                   "collaborator": self.name})

    def _round_moved_on(self, r: int, exc: grpc.RpcError) -> bool:
        """Whether a refusal means we were too late for round r (a straggler), which is
        no failure: the next round goes on with us."""
        if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
            return False
        response = self._call(self._stub.GetTasks,
                              aggregator_pb2.GetTasksRequest(header=self._header))
        return bool(response.quit or response.round_number != r)

    def _work(self, r: int, tasks: list[str]) -> int:
        """Runs one round's tasks; returns 1 if it trained."""
        trained = 0
        model = self.fetch_model(r)
        for name in tasks:
            if name == "validate":
                data = self.shard.get_dataset("val")
                metrics = self.task.validate(model, data, self.plan.params)
                self.send(r, "validate", len(data[1]), list(metric_tensors(metrics, r)))
            elif name == "train":
                data = self.shard.get_dataset("train")
                seed = int(self.plan.params.get("seed", 0)) + 1000 * r
                params = {**self.plan.params, "seed": seed + zlib.crc32(self.name.encode())}
                updated, metrics = self.task.train(model, data, params)
                self.send(r, "train", len(data[1]), list(metric_tensors(metrics, r)),
                          arrays=list(updated.items()))
                trained += 1
            log.info("round %d: %s done", r, name,
                     extra={"experiment": self.experiment, "round": r,
                            "collaborator": self.name})
        return trained

    def close(self) -> None:
        self._channel.close()


def fetch_archive(target: str, tls: TLSFiles | None, experiment: str, name: str,
                  dest: Path) -> Path:
    """Downloads the experiment archive as the envoy does (a collaborator Pod has no
    shared disk with its envoy)."""
    from fedkube.proto import director_pb2, director_pb2_grpc

    channel = open_sync_channel(target, tls=tls)
    try:
        stub = director_pb2_grpc.DirectorStub(channel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with dest.open("wb") as sink:
            for chunk in stub.GetExperimentData(
                    director_pb2.GetExperimentDataRequest(experiment_name=experiment,
                                                          collaborator_name=name),
                    metadata=(("client_id", name),), timeout=600):
                sink.write(chunk.npbytes)
    finally:
        channel.close()
    return dest


def extract(archive: Path, work_dir: Path) -> tuple[Plan, Path]:
    """Extracts the archive safely; its plan and the workspace it went to."""
    plan = read_plan(archive)
    workspace = work_dir / "workspace"
    safe_extract(archive, workspace)
    return plan, workspace
