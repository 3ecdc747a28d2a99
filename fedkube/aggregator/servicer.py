"""`openfl.aggregator.Aggregator` over grpc.aio, for every running experiment at once.

A collaborator names its experiment in `header.federation_uuid` and itself in
`header.sender`; under mTLS the sender must be the certificate's CN.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from fedkube.aggregator.experiment import expected_result_bytes
from fedkube.aggregator.openfl_rounds import OpenFLRounds
from fedkube.aggregator.runner import AggregatorRunner
from fedkube.api.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from fedkube.proto import aggregator_pb2, aggregator_pb2_grpc, streaming_pb2
from fedkube.transport import metrics as transfer_metrics
from fedkube.transport.guard import add_guarded_service, generated_handlers
from fedkube.transport.identity import acting_for_another, caller_identity
from fedkube.transport.limits import CHUNK_BYTES
from fedkube.transport.roles import caller_role, refusal
from fedkube.transport.status import Context, stream_errors, unary_errors
from fedkube.transport.tensors import (
    ChunkAssembler,
    TensorError,
    chunk_frames,
    encode_tensor_response,
    parse_task_results,
)

# A result may carry metrics and headers beyond the model; nothing near 4x the model.
RESULT_LIMIT_FACTOR = 4
# The gRPC methods whose role-table rows the bulk transfers follow.
STREAM_METHOD = "/fedkube.streaming.TensorStream/StreamAggregatedTensor"
RESULTS_METHOD = "/openfl.aggregator.Aggregator/SendLocalTaskResults"


class AggregatorService(aggregator_pb2_grpc.AggregatorServicer):
    def __init__(self, runner: AggregatorRunner, *, tls: bool) -> None:
        self.runner = runner
        self.tls = tls
        self.bulk_port: int | None = None  # fedkube.transport.bulk, where the director runs it

    def _sender(self, header: aggregator_pb2.MessageHeader, context: Context) -> str:
        if self.tls:
            caller = caller_identity(context, tls=True)
            if caller != header.sender:
                raise PermissionDeniedError(acting_for_another(caller, header.sender))
        return header.sender

    def _reply_header(self, header: aggregator_pb2.MessageHeader
                      ) -> aggregator_pb2.MessageHeader:
        return aggregator_pb2.MessageHeader(sender=header.receiver, receiver=header.sender,
                                            federation_uuid=header.federation_uuid)

    @unary_errors
    async def GetTasks(self, request: aggregator_pb2.GetTasksRequest,
                       context: Context) -> aggregator_pb2.GetTasksResponse:
        sender = self._sender(request.header, context)
        name = request.header.federation_uuid
        rounds = None if self.runner.over_for(name, sender) else self.runner.rounds(name)
        if rounds is None:
            response = aggregator_pb2.GetTasksResponse(quit=True)
        elif isinstance(rounds, OpenFLRounds):
            response = await rounds.next_tasks(sender)
        else:
            response = rounds.get_tasks(sender)
        response.header.CopyFrom(self._reply_header(request.header))
        return response

    @unary_errors
    async def GetAggregatedTensor(self, request: aggregator_pb2.GetAggregatedTensorRequest,
                                  context: Context
                                  ) -> aggregator_pb2.GetAggregatedTensorResponse:
        sender = self._sender(request.header, context)
        aggregator = self.runner.rounds(request.header.federation_uuid)
        tensor = aggregator.get_tensor(sender, request.tensor_name, request.round_number,
                                       tags=tuple(request.tags),
                                       require_lossless=request.require_lossless)
        transfer_metrics.BYTES_SENT.labels("GetAggregatedTensor").inc(tensor.ByteSize())  # no copy
        return aggregator_pb2.GetAggregatedTensorResponse(
            header=self._reply_header(request.header), round_number=aggregator.round,
            tensor=tensor)

    @unary_errors
    async def SendLocalTaskResults(self, request_iterator: AsyncIterator[bytes],
                                   context: Context
                                   ) -> aggregator_pb2.SendLocalTaskResultsResponse:
        # The experiment is named inside the message, so size the buffer on the largest
        # running model; the parsed header then picks the aggregator.
        largest = max((expected_result_bytes(a.model) for a in self.runner.running()),
                      default=1 << 20)
        assembler = ChunkAssembler(largest, RESULT_LIMIT_FACTOR * largest)
        try:
            async for frame in request_iterator:  # DataStream wire bytes, parsed here
                assembler.add_frame(frame)
                transfer_metrics.BYTES_RECEIVED.labels("SendLocalTaskResults").inc(len(frame))
            results, payloads = assembler.parse()
        except OverflowError as exc:
            raise ResourceExhaustedError(str(exc)) from exc
        except (TensorError, ValueError, DecodeError) as exc:
            raise InvalidArgumentError(f"malformed task results: {exc}") from exc
        return await self._take_results(results, payloads, context)

    async def _take_results(self, results: aggregator_pb2.TaskResults,
                            payloads: list[memoryview], context: Context
                            ) -> aggregator_pb2.SendLocalTaskResultsResponse:
        sender = self._sender(results.header, context)
        await self.runner.rounds(results.header.federation_uuid).receive(
            sender, results, payloads)
        return aggregator_pb2.SendLocalTaskResultsResponse(
            header=self._reply_header(results.header))

    @stream_errors
    async def StreamAggregatedTensor(self, request: aggregator_pb2.GetAggregatedTensorRequest,
                                     context: Context) -> AsyncIterator[bytes]:
        """fedkube.streaming.TensorStream: GetAggregatedTensor's reply in chunks, read
        straight from the global model's memory, as DataStream wire bytes."""
        for frame in chunk_frames(self._tensor_segments(request, context), CHUNK_BYTES):
            transfer_metrics.BYTES_SENT.labels("StreamAggregatedTensor").inc(len(frame))
            yield frame

    def _tensor_segments(self, request: aggregator_pb2.GetAggregatedTensorRequest,
                         context: Context) -> list[bytes | memoryview]:
        sender = self._sender(request.header, context)
        aggregator = self.runner.rounds(request.header.federation_uuid)
        values = aggregator.tensor_values(sender, request.tensor_name, request.round_number)
        return encode_tensor_response(self._reply_header(request.header), aggregator.round,
                                      request.tensor_name, values)

    @unary_errors
    async def BulkEndpoint(self, request: streaming_pb2.BulkEndpointRequest,
                           context: Context) -> streaming_pb2.BulkEndpointResponse:
        return streaming_pb2.BulkEndpointResponse(port=self.bulk_port or 0)

    # -- the same over fedkube.transport.bulk (called on the director's event loop) -------

    async def bulk_download(self, request: aggregator_pb2.GetAggregatedTensorRequest,
                            context: Context) -> list[bytes | memoryview]:
        self._admit(STREAM_METHOD, context)
        segments = self._tensor_segments(request, context)
        transfer_metrics.BYTES_SENT.labels("BulkDownload").inc(sum(memoryview(s).nbytes
                                                          for s in segments))
        return segments

    async def bulk_upload_limit(self, header: aggregator_pb2.MessageHeader,
                                context: Context) -> int:
        """Checked before the body is read: who may upload, and how much at most."""
        self._admit(RESULTS_METHOD, context)
        self._sender(header, context)
        aggregator = self.runner.rounds(header.federation_uuid)
        return RESULT_LIMIT_FACTOR * expected_result_bytes(aggregator.model)

    async def bulk_upload(self, header: aggregator_pb2.MessageHeader, body: memoryview,
                          context: Context) -> aggregator_pb2.SendLocalTaskResultsResponse:
        try:
            results, payloads = parse_task_results(body)
        except (TensorError, ValueError, DecodeError) as exc:
            raise InvalidArgumentError(f"malformed task results: {exc}") from exc
        if (results.header.sender, results.header.federation_uuid) != (
                header.sender, header.federation_uuid):
            raise InvalidArgumentError("the results' header names another sender or "
                                       "experiment than the upload's")
        transfer_metrics.BYTES_RECEIVED.labels("BulkUpload").inc(len(body))
        return await self._take_results(results, payloads, context)

    def _admit(self, method: str, context: Context) -> None:
        """The role table, as the gRPC port's guard applies it (fedkube.transport.guard)."""
        if self.tls:
            reason = refusal(method, caller_role(context))
            if reason is not None:
                raise PermissionDeniedError(reason)

    @stream_errors
    async def GetMetricStream(self, request: Any, context: Context) -> AsyncIterator[Any]:
        raise FailedPreconditionError("stream metrics from the director (GetMetricStream)")
        yield  # an async generator, as a server-streaming RPC must be

    @unary_errors
    async def GetTrainedModel(self, request: Any, context: Context) -> Any:
        raise FailedPreconditionError("fetch models from the director (GetTrainedModel)")

    @unary_errors
    async def GetExperimentDescription(self, request: Any, context: Context) -> Any:
        raise FailedPreconditionError("describe experiments through the director")


def add_aggregator_to_server(service: AggregatorService, server: grpc.aio.Server, *,
                             check_roles: bool = False, forwarded: bool = False) -> None:
    """Serves openfl.aggregator.Aggregator and fedkube.streaming.TensorStream. The model-
    sized streams skip protobuf: SendLocalTaskResults gets its DataStream chunks as wire
    bytes and StreamAggregatedTensor yields them, each copied once."""
    handlers = generated_handlers(aggregator_pb2_grpc.add_AggregatorServicer_to_server,
                                  service)
    results = handlers["SendLocalTaskResults"]
    handlers["SendLocalTaskResults"] = grpc.stream_unary_rpc_method_handler(
        service.SendLocalTaskResults, request_deserializer=None,
        response_serializer=results.response_serializer)
    stream = grpc.unary_stream_rpc_method_handler(
        service.StreamAggregatedTensor,
        request_deserializer=aggregator_pb2.GetAggregatedTensorRequest.FromString,
        response_serializer=None)
    add_guarded_service(server, "openfl.aggregator.Aggregator", handlers,
                        check_roles=check_roles, forwarded=forwarded)
    endpoint = grpc.unary_unary_rpc_method_handler(
        service.BulkEndpoint,
        request_deserializer=streaming_pb2.BulkEndpointRequest.FromString,
        response_serializer=streaming_pb2.BulkEndpointResponse.SerializeToString)
    add_guarded_service(server, "fedkube.streaming.TensorStream",
                        {"StreamAggregatedTensor": stream, "BulkEndpoint": endpoint},
                        check_roles=check_roles, forwarded=forwarded)
