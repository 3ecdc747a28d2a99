"""A model owner's client of the director (blocking; fit for scripts and notebooks).

    from fedkube.client import DirectorClient
    certs = Path("certs")
    with DirectorClient.from_files("director.example:50051", ca=certs / "ca.crt",
                                   cert=certs / "alice.crt", key=certs / "alice.key") as client:
        print(client.envoys())

`DirectorClient(target, insecure=True, client_id="alice")` is for local development only:
the director then believes whatever name the caller sends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from fedkube.api.plan import Plan
from fedkube.api.review import reviews_of
from fedkube.proto import base_pb2, director_pb2, director_pb2_grpc
from fedkube.tasks.archive import build_archive, load_task
from fedkube.tasks.params import check_params
from fedkube.transport.channel import open_sync_channel
from fedkube.transport.identity import CLIENT_ID_HEADER
from fedkube.transport.limits import CHUNK_BYTES, MODEL_BYTES_HEADER
from fedkube.transport.model_files import model_data_bytes
from fedkube.transport.tensors import model_from_proto, model_pieces, model_to_proto
from fedkube.transport.tls import TLSFiles
from fedkube.transport.trailers import read_text_trailers


@dataclass(frozen=True)
class EnvoyView:
    """One row of the director's registry, as `fedkube shards` shows it."""

    name: str
    online: bool
    experiment_running: bool
    experiment: str
    description: str
    n_samples: int
    sample_shape: list[str]
    target_shape: list[str]
    cuda_devices: list[dict[str, Any]]
    last_health_check: float

    @classmethod
    def from_proto(cls, info: director_pb2.EnvoyInfo) -> EnvoyView:
        shard = info.shard_info
        return cls(
            name=shard.node_info.name, online=info.is_online,
            experiment_running=info.is_experiment_running, experiment=info.experiment_name,
            description=shard.shard_description, n_samples=shard.n_samples,
            sample_shape=list(shard.sample_shape), target_shape=list(shard.target_shape),
            cuda_devices=[
                {"index": d.index, "name": d.name, "memory_total": d.memory_total,
                 "memory_utilized": d.memory_utilized, "utilization": d.device_utilization,
                 "driver": d.cuda_driver_version, "cuda": d.cuda_version}
                for d in shard.node_info.cuda_devices],
            last_health_check=info.last_updated.ToNanoseconds() / 1e9,
        )


@dataclass(frozen=True)
class Review:
    decision: str  # accepted | refused | awaiting
    reason: str


@dataclass(frozen=True)
class ExperimentView:
    """An experiment as `fedkube experiment status --output json` prints it."""

    name: str
    status: str  # pending | in_progress | finished | failed | rejected
    round: int
    total_rounds: int
    metric: str
    last_metrics: dict[str, float]
    best_metrics: dict[str, float]
    error: str
    queue_position: int
    collaborators: list[str]
    # Collaborators that missed a round's deadline at least once.
    dropped: list[str] = field(default_factory=list)
    # Each shard's decision on it, for the shards that have decided (fedkube envoys).
    review: dict[str, Review] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status in ("finished", "failed", "rejected")

    @property
    def awaiting_approval(self) -> list[str]:
        """The shards whose data owners have not answered yet."""
        return [shard for shard, r in self.review.items() if r.decision == "awaiting"]


@dataclass(frozen=True)
class Metric:
    origin: str
    task: str
    name: str
    value: float
    round: int


class DirectorClient:
    def __init__(self, target: str, *, tls: TLSFiles | None = None, client_id: str = "owner",
                 timeout: float = 30.0) -> None:
        self._channel = open_sync_channel(target, tls=tls)
        self._stub = director_pb2_grpc.DirectorStub(self._channel)
        self._metadata = ((CLIENT_ID_HEADER, client_id),)
        self.timeout = timeout

    @classmethod
    def from_files(cls, target: str, *, ca: Path | None, cert: Path | None, key: Path | None,
                   client_id: str = "owner") -> DirectorClient:
        tls = None
        if ca and cert and key:
            tls = TLSFiles(ca=ca.read_bytes(), cert=cert.read_bytes(), key=key.read_bytes())
        return cls(target, tls=tls, client_id=client_id)

    def __enter__(self) -> DirectorClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def envoys(self) -> list[EnvoyView]:
        response = self._stub.GetEnvoys(director_pb2.GetEnvoysRequest(),
                                        metadata=self._metadata, timeout=self.timeout)
        return [EnvoyView.from_proto(info) for info in response.envoy_infos]

    def wait_online(self, count: int, *, timeout: float = 300,
                    interval: float = 0.25) -> list[EnvoyView]:
        """The registry once at least `count` shards are online (the director may still be
        starting); TimeoutError naming how many were online otherwise."""
        deadline = time.monotonic() + timeout
        online = 0
        while time.monotonic() < deadline:
            try:
                envoys = self.envoys()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            else:
                online = sum(e.online for e in envoys)
                if online >= count:
                    return envoys
            time.sleep(interval)
        raise TimeoutError(f"{online} of {count} shards online after {timeout:g}s")

    # -- experiments ----------------------------------------------------------------------

    def submit(self, name: str, archive: bytes, *, collaborators: list[str] | None = None,
               initial_model: base_pb2.ModelProto | None = None) -> None:
        """Uploads an experiment archive; collaborators default to every online shard.
        The model's size goes ahead in the call's metadata: a director that takes no
        model that large refuses it (RESOURCE_EXHAUSTED, naming its limit) at once."""
        if collaborators is None:
            collaborators = sorted(e.name for e in self.envoys() if e.online)
        model = initial_model or base_pb2.ModelProto()

        def messages() -> Iterator[director_pb2.ExperimentInfo]:
            # The archive in chunks, then the model in pieces of the same size: any
            # model fits, where OpenFL sends it whole in the first message.
            view = memoryview(archive)
            for offset in range(0, max(len(view), 1), CHUNK_BYTES):
                chunk = bytes(view[offset:offset + CHUNK_BYTES])
                yield director_pb2.ExperimentInfo(
                    name=name, collaborator_names=collaborators,
                    experiment_data=director_pb2.ExperimentData(size=len(chunk), npbytes=chunk))
            for piece in model_pieces(model, CHUNK_BYTES):
                yield director_pb2.ExperimentInfo(
                    name=name, collaborator_names=collaborators,
                    experiment_data=director_pb2.ExperimentData(), model_proto=piece)

        metadata = (*self._metadata, (MODEL_BYTES_HEADER, str(model_data_bytes(model))))
        self._stub.SetNewExperiment(messages(), metadata=metadata, timeout=self.timeout)

    def experiments(self) -> list[tuple[str, str, float]]:
        response = self._stub.GetExperimentsList(director_pb2.GetExperimentsListRequest(),
                                                 metadata=self._metadata, timeout=self.timeout)
        return [(e.name, e.status, e.progress) for e in response.experiments]

    def status(self, name: str) -> ExperimentView:
        response, call = self._stub.GetExperimentDescription.with_call(
            director_pb2.GetExperimentDescriptionRequest(name=name), metadata=self._metadata,
            timeout=self.timeout)
        extra = read_text_trailers(call.trailing_metadata(), "fedkube-")
        metric = extra.get("metric", "")

        def figure(key: str) -> dict[str, float]:
            return {metric: float(extra[key])} if metric and extra.get(key) else {}

        experiment = response.experiment
        return ExperimentView(
            name=experiment.name, status=experiment.status, round=experiment.current_round,
            total_rounds=experiment.total_rounds, metric=metric,
            last_metrics=figure("last-metric"), best_metrics=figure("best-metric"),
            error=extra.get("error", ""), queue_position=int(extra.get("queue-position", 0)),
            collaborators=[c.name for c in experiment.collaborators],
            dropped=[d for d in extra.get("dropped", "").split(",") if d],
            review={shard: Review(*decided)
                    for shard, decided in sorted(reviews_of(extra).items())})

    def wait(self, name: str, *, timeout: float = 3600, interval: float = 0.5,
             on_update: Callable[[ExperimentView], None] | None = None) -> ExperimentView:
        """Polls the status until the experiment ends, riding out director restarts."""
        deadline = time.monotonic() + timeout
        first: grpc.RpcError | None = None  # the first failure tells best why (later ones
        # may be of another of the host's addresses, or a reconnection's backoff)
        while True:
            try:
                status = self.status(name)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                first = first or exc
                if time.monotonic() > deadline:
                    raise TimeoutError(f"director unreachable for {timeout}s") from first
                time.sleep(interval)
                continue
            if on_update is not None:
                on_update(status)
            if status.done:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"experiment {name} still {status.status} after {timeout}s")
            time.sleep(interval)

    def metrics(self, name: str, *, follow: bool = True,
                snapshot_s: float = 2.0) -> list[Metric]:
        """Every metric of the experiment: followed until it ends, or (follow=False) what
        a running experiment has reported within snapshot_s."""
        if not follow and self.status(name).done:
            follow = True  # a finished experiment's stream ends by itself
        stream = self._stub.GetMetricStream(
            director_pb2.GetMetricStreamRequest(experiment_name=name), metadata=self._metadata,
            timeout=None if follow else snapshot_s)
        metrics = []
        try:
            for m in stream:
                metrics.append(Metric(m.metric_origin, m.task_name, m.metric_name,
                                      m.metric_value, m.round))
        except grpc.RpcError as exc:
            if follow or exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        return metrics

    def model(self, name: str, *, best: bool = True) -> dict[str, npt.NDArray[np.float32]]:
        kind = director_pb2.GetTrainedModelRequest.BEST_MODEL if best else (
            director_pb2.GetTrainedModelRequest.LAST_MODEL)
        response = self._stub.GetTrainedModel(
            director_pb2.GetTrainedModelRequest(experiment_name=name, model_type=kind),
            metadata=self._metadata, timeout=self.timeout)
        return model_from_proto(response.model_proto)

    def remove(self, name: str) -> None:
        self._stub.RemoveExperimentData(director_pb2.RemoveExperimentRequest(
            experiment_name=name), metadata=self._metadata, timeout=self.timeout)

    def dataset_info(self) -> tuple[list[str], list[str]]:
        response = self._stub.GetDatasetInfo(director_pb2.GetDatasetInfoRequest(),
                                             metadata=self._metadata, timeout=self.timeout)
        return list(response.shard_info.sample_shape), list(response.shard_info.target_shape)


def experiment_archive(plan: Plan, files: dict[str, bytes] | None = None
                       ) -> tuple[bytes, base_pb2.ModelProto]:
    """The archive and initial model for a plan (user modules go in `files`).

    The initial model comes from the task's `init_model`, run here: a user module should
    import packages it lists in requirements.txt inside `train`/`validate`, not at the top.
    The plan's params are checked first against the task's schema, if it declares one
    (fedkube.tasks.params.ParamsError)."""
    archive = build_archive(plan, files)
    if not files:
        task = load_task(plan, None)
        check_params(plan.task, task.params, plan.params)
        return archive, model_to_proto(task.init_model(plan.params))
    import tempfile

    from fedkube.tasks.archive import safe_extract

    with tempfile.TemporaryDirectory(prefix="fedkube-submit-") as tmp:
        safe_extract(archive, Path(tmp))
        task = load_task(plan, Path(tmp))
        check_params(plan.task, task.params, plan.params)
        return archive, model_to_proto(task.init_model(plan.params))
