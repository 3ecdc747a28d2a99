"""`openfl.director.Director` over grpc.aio: parses each request, calls the director's
core (fedkube.director.core) or the upload of a new experiment (fedkube.director.upload),
and builds the reply; `unary_errors` and `stream_errors` map the errors they raise to
gRPC status codes.

The experiments, the shards and the rules on them (validation, scheduling, statuses, who
may see what) live in the core. What this module decides itself is who the caller is: its
certificate's identity under mTLS, with which an envoy acts only for its own shard, and
whether it is an admin, who sees every owner's experiments. Its only state is the
`ExperimentUploads` under way; it also counts health checks and the archive bytes sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fedkube.aggregator.runner import AggregatorRunner
from fedkube.api.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
)
from fedkube.director import metrics
from fedkube.director.core import Director
from fedkube.director.store import ExperimentRecord
from fedkube.director.upload import ExperimentUploads, declared_model_bytes
from fedkube.proto import base_pb2, director_pb2, director_pb2_grpc, review_pb2, review_pb2_grpc
from fedkube.transport import metrics as transfer_metrics
from fedkube.transport.identity import (
    REASON_HEADER,
    acting_for_another,
    caller_identity,
    caller_principal,
)
from fedkube.transport.limits import CHUNK_BYTES
from fedkube.transport.roles import is_admin
from fedkube.transport.status import Context, stream_errors, unary_errors
from fedkube.transport.trailers import text_trailers

log = logging.getLogger(__name__)



def experiment_description(record: ExperimentRecord,
                           shown_name: str) -> base_pb2.ExperimentDescription:
    progress = record.current_round / record.total_rounds if record.total_rounds else 0.0
    return base_pb2.ExperimentDescription(
        name=shown_name, status=record.status.value, progress=progress,
        total_rounds=record.total_rounds, current_round=record.current_round,
        download_statuses=base_pb2.DownloadStatuses(),
        collaborators=[base_pb2.CollaboratorDescription(name=c, status=record.status.value,
                                                        round=record.current_round)
                       for c in record.collaborators],
        tasks=[base_pb2.TaskDescription(name="train"), base_pb2.TaskDescription(name="validate")],
    )


class DirectorService(director_pb2_grpc.DirectorServicer):
    def __init__(self, director: Director, *, tls: bool,
                 max_model_bytes: int | None = None) -> None:
        self.director = director
        self.tls = tls
        self.uploads = ExperimentUploads(director, max_model_bytes=max_model_bytes)

    def _caller(self, context: Context) -> str:
        return caller_identity(context, tls=self.tls)

    def _viewer(self, context: Context) -> tuple[str, bool]:
        """Who owns what the caller submits, (role, CN) under mTLS, and whether it is an
        admin (who sees every owner's experiments)."""
        return caller_principal(context, tls=self.tls), is_admin(context, tls=self.tls)

    def _require_self(self, context: Context, claimed: str) -> None:
        """Under mTLS an envoy acts only for the shard named in its certificate."""
        if self.tls:
            caller = self._caller(context)
            if caller != claimed:
                raise PermissionDeniedError(acting_for_another(caller, claimed))

    # -- envoy RPCs ---------------------------------------------------------------------

    @unary_errors
    async def UpdateShardInfo(self, request: director_pb2.UpdateShardInfoRequest,
                              context: Context) -> director_pb2.UpdateShardInfoResponse:
        self._require_self(context, request.shard_info.node_info.name)
        ack = self.director.acknowledge_shard(request.shard_info)
        if ack.reason:
            context.set_trailing_metadata(text_trailers([(REASON_HEADER, ack.reason)]))
        return director_pb2.UpdateShardInfoResponse(accepted=ack.accepted)

    @unary_errors
    async def UpdateEnvoyStatus(self, request: director_pb2.UpdateEnvoyStatusRequest,
                                context: Context) -> director_pb2.UpdateEnvoyStatusResponse:
        if self.tls:
            self._require_self(context, request.name)
        period = self.director.update_envoy_status(
            request.name, is_experiment_running=request.is_experiment_running,
            cuda_devices=request.cuda_devices)
        metrics.HEALTH_CHECKS.inc()
        response = director_pb2.UpdateEnvoyStatusResponse()
        response.health_check_period.FromNanoseconds(int(period * 1e9))
        return response

    @unary_errors
    async def WaitExperiment(self, request: director_pb2.WaitExperimentRequest,
                             context: Context) -> director_pb2.WaitExperimentResponse:
        self._require_self(context, request.collaborator_name)
        name = await self.director.wait_experiment(request.collaborator_name)
        return director_pb2.WaitExperimentResponse(experiment_name=name)

    @stream_errors
    async def GetExperimentData(self, request: director_pb2.GetExperimentDataRequest,
                                context: Context) -> AsyncIterator[director_pb2.ExperimentData]:
        self._require_self(context, request.collaborator_name)
        path = self.director.get_experiment_data(request.experiment_name,
                                                 request.collaborator_name)
        with path.open("rb") as archive:
            while chunk := archive.read(CHUNK_BYTES):
                transfer_metrics.BYTES_SENT.labels("GetExperimentData").inc(len(chunk))
                yield director_pb2.ExperimentData(size=len(chunk), npbytes=chunk)

    @unary_errors
    async def SetExperimentFailed(self, request: director_pb2.SetExperimentFailedRequest,
                                  context: Context) -> director_pb2.SetExperimentFailedResponse:
        self._require_self(context, request.collaborator_name)
        self.director.set_experiment_failed(request.experiment_name, request.collaborator_name,
                                            request.error_code, request.error_description)
        return director_pb2.SetExperimentFailedResponse()

    # -- model owner RPCs ---------------------------------------------------------------

    @unary_errors
    async def SetNewExperiment(self, request_iterator: AsyncIterator[director_pb2.ExperimentInfo],
                               context: Context) -> director_pb2.SetNewExperimentResponse:
        await self.uploads.receive(
            self._viewer(context)[0], request_iterator,
            declared_model_bytes=declared_model_bytes(context.invocation_metadata()))
        return director_pb2.SetNewExperimentResponse(accepted=True)

    @unary_errors
    async def GetExperimentsList(self, request: director_pb2.GetExperimentsListRequest,
                                 context: Context) -> director_pb2.GetExperimentsListResponse:
        items = []
        caller, admin = self._viewer(context)
        for record in self.director.get_experiments_list(caller, admin):
            progress = record.current_round / record.total_rounds if record.total_rounds else 0.0
            items.append(director_pb2.ExperimentListItem(
                name=self.director.shown_name(record, caller, admin), status=record.status.value,
                collaborators_amount=len(record.collaborators), tasks_amount=2,
                progress=progress))
        return director_pb2.GetExperimentsListResponse(experiments=items)

    @unary_errors
    async def GetExperimentDescription(
        self, request: director_pb2.GetExperimentDescriptionRequest, context: Context,
    ) -> director_pb2.GetExperimentDescriptionResponse:
        caller, admin = self._viewer(context)
        record = self.director.get_experiment_status(caller, request.name, admin)
        # What OpenFL's message has no field for travels as trailing metadata.
        extras = {"fedkube-error": record.error,
                  "fedkube-queue-position": str(self.director.queue_position(record.name)),
                  **{f"fedkube-{k.replace('_', '-')}": v for k, v in record.extra.items()}}
        context.set_trailing_metadata(text_trailers(extras.items()))
        return director_pb2.GetExperimentDescriptionResponse(
            experiment=experiment_description(
                record, self.director.shown_name(record, caller, admin)))

    @unary_errors
    async def GetExperimentStatus(self, request: director_pb2.GetExperimentStatusRequest,
                                  context: Context) -> director_pb2.GetExperimentStatusResponse:
        caller, admin = self._viewer(context)
        record = self.director.get_experiment_status(caller, request.experiment_name, admin)
        return director_pb2.GetExperimentStatusResponse(experiment_status=record.status.value)

    @unary_errors
    async def GetDatasetInfo(self, request: director_pb2.GetDatasetInfoRequest,
                             context: Context) -> director_pb2.GetDatasetInfoResponse:
        sample, target = self.director.get_dataset_info()
        return director_pb2.GetDatasetInfoResponse(
            shard_info=director_pb2.ShardInfo(sample_shape=sample, target_shape=target))

    @unary_errors
    async def GetTrainedModel(self, request: director_pb2.GetTrainedModelRequest,
                              context: Context) -> director_pb2.TrainedModelResponse:
        caller, admin = self._viewer(context)
        record = self.director.get_experiment_status(caller, request.experiment_name, admin)
        best = request.model_type == director_pb2.GetTrainedModelRequest.BEST_MODEL
        directory = self.director.experiment_dir(record.name)

        def response() -> director_pb2.TrainedModelResponse:
            return director_pb2.TrainedModelResponse(
                model_proto=AggregatorRunner.trained_model(directory, best=best))

        # Read and built off the event loop: a model-sized file and two copies of it
        # would hold up every other call (health checks included) meanwhile.
        return await asyncio.to_thread(response)

    @stream_errors
    async def GetMetricStream(
        self, request: director_pb2.GetMetricStreamRequest, context: Context,
    ) -> AsyncIterator[director_pb2.GetMetricStreamResponse]:
        caller, admin = self._viewer(context)
        record = self.director.get_experiment_status(caller, request.experiment_name, admin)
        if not isinstance(self.director.runner, AggregatorRunner):
            raise FailedPreconditionError("this director runs no aggregators")
        async for event in self.director.runner.metrics(
                record.name, self.director.experiment_dir(record.name)):
            yield director_pb2.GetMetricStreamResponse(
                metric_origin=event.origin, task_name=event.task, metric_name=event.name,
                metric_value=event.value, round=event.round)

    @unary_errors
    async def RemoveExperimentData(self, request: director_pb2.RemoveExperimentRequest,
                                   context: Context) -> director_pb2.RemoveExperimentResponse:
        caller, admin = self._viewer(context)
        self.director.remove_experiment_data(caller, request.experiment_name, admin)
        return director_pb2.RemoveExperimentResponse(acknowledgement=True)

    @unary_errors
    async def GetEnvoys(self, request: director_pb2.GetEnvoysRequest,
                        context: Context) -> director_pb2.GetEnvoysResponse:
        infos = []
        period = self.director.health_check_period
        caller, admin = self._viewer(context)
        visible = {r.name: self.director.shown_name(r, caller, admin)
                   for r in self.director.get_experiments_list(caller, admin)}
        for state in self.director.get_envoys():
            # Whether a shard is busy is everyone's to see (it is unavailable); what it
            # runs is only its owner's (and an admin's).
            current = state.current_experiment or ""
            info = director_pb2.EnvoyInfo(
                shard_info=state.shard_info, is_online=self.director.is_online(state),
                is_experiment_running=state.is_experiment_running,
                experiment_name=visible.get(current, ""))
            info.last_updated.FromNanoseconds(int(state.last_updated * 1e9))
            info.valid_duration.FromNanoseconds(int(2 * period * 1e9))
            infos.append(info)
        return director_pb2.GetEnvoysResponse(envoy_infos=infos)


_DECISIONS = {review_pb2.ACCEPTED: "accepted", review_pb2.REFUSED: "refused",
              review_pb2.AWAITING: "awaiting"}


class ReviewService(review_pb2_grpc.ReviewServicer):
    """fedkube.review.Review: an envoy's decision on an experiment dispatched to its shard,
    as its shard policy and its data owner answered (under mTLS only for its own shard)."""

    def __init__(self, director: Director, *, tls: bool) -> None:
        self.director = director
        self.tls = tls

    def _require_self(self, context: Context, claimed: str) -> None:
        if self.tls:
            caller = caller_identity(context, tls=True)
            if caller != claimed:
                raise PermissionDeniedError(acting_for_another(caller, claimed))

    @unary_errors
    async def Describe(self, request: review_pb2.DescribeRequest,
                       context: Context) -> review_pb2.DescribeResponse:
        self._require_self(context, request.shard_name)
        record = self.director.describe_for_review(request.experiment_name, request.shard_name)
        return review_pb2.DescribeResponse(owner=record.owner, status=record.status.value)

    @unary_errors
    async def Decide(self, request: review_pb2.DecideRequest,
                     context: Context) -> review_pb2.DecideResponse:
        self._require_self(context, request.shard_name)
        decision = _DECISIONS.get(request.decision)
        if decision is None:
            raise InvalidArgumentError("decision must be ACCEPTED, REFUSED or AWAITING")
        self.director.decide(request.experiment_name, request.shard_name, decision,
                             request.reason[:2000])
        return review_pb2.DecideResponse()
