"""Client channels: TLS or plaintext, with the caller's `client_id` header on every call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from fedkube.transport.identity import CLIENT_ID_HEADER
from fedkube.transport.limits import GRPC_OPTIONS
from fedkube.transport.tls import TLSFiles, channel_credentials


def _with_client_id(details: Any, client_id: str) -> Any:
    metadata = list(details.metadata or ())
    metadata.append((CLIENT_ID_HEADER, client_id))
    return details._replace(metadata=metadata)


class _AddClientId:
    def __init__(self, client_id: str) -> None:
        self._client_id = client_id

    async def _continue(self, continuation: Callable[..., Any], details: Any,
                        request: Any) -> Any:
        return await continuation(_with_client_id(details, self._client_id), request)


# grpc.aio files each interceptor under the first call type it implements, so each call
# type needs a class of its own.
class _UnaryUnary(_AddClientId, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                                    request: Any) -> Any:
        return await self._continue(continuation, details, request)


class _UnaryStream(_AddClientId, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any,
                                     request: Any) -> Any:
        return await self._continue(continuation, details, request)


class _StreamUnary(_AddClientId, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any,
                                     request_iterator: Any) -> Any:
        return await self._continue(continuation, details, request_iterator)


class _StreamStream(_AddClientId, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any,
                                      request_iterator: Any) -> Any:
        return await self._continue(continuation, details, request_iterator)


def open_channel(target: str, *, tls: TLSFiles | None, client_id: str,
                 options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    """An asyncio channel to host:port. Under mTLS the certificate says who we are."""
    opts = [*GRPC_OPTIONS, *(options or [])]
    interceptors: list[Any] = [cls(client_id) for cls in (_UnaryUnary, _UnaryStream,
                                                           _StreamUnary, _StreamStream)]
    if tls is None:
        return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)
    return grpc.aio.secure_channel(target, channel_credentials(tls), options=opts,
                                   interceptors=interceptors)


def open_sync_channel(target: str, *, tls: TLSFiles | None,
                      options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A blocking channel to host:port (clients, collaborators), with our limits."""
    opts = [*GRPC_OPTIONS, *(options or [])]
    if tls is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, channel_credentials(tls), options=opts)


GET_AGGREGATED_TENSOR = "/openfl.aggregator.Aggregator/GetAggregatedTensor"
STREAM_AGGREGATED_TENSOR = "/fedkube.streaming.TensorStream/StreamAggregatedTensor"


def raw_tensor_call(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable[Any, bytes]:
    """GetAggregatedTensor answering with the reply's wire bytes, for
    tensors.parse_tensor_response: the tensor is read in place, not copied twice more."""
    from fedkube.proto import aggregator_pb2

    return channel.unary_unary(
        GET_AGGREGATED_TENSOR,
        request_serializer=aggregator_pb2.GetAggregatedTensorRequest.SerializeToString,
        response_deserializer=None)


def raw_tensor_stream(channel: grpc.Channel) -> grpc.UnaryStreamMultiCallable[Any, bytes]:
    """StreamAggregatedTensor answering with each chunk's wire bytes, for
    tensors.StreamReceiver."""
    from fedkube.proto import aggregator_pb2

    return channel.unary_stream(
        STREAM_AGGREGATED_TENSOR,
        request_serializer=aggregator_pb2.GetAggregatedTensorRequest.SerializeToString,
        response_deserializer=None)


def raw_results_call(channel: grpc.Channel) -> grpc.StreamUnaryMultiCallable[bytes, Any]:
    """SendLocalTaskResults taking DataStream wire bytes (tensors.chunk_frames), so the
    model's memory is copied once on its way out."""
    from fedkube.proto import aggregator_pb2

    return channel.stream_unary(
        "/openfl.aggregator.Aggregator/SendLocalTaskResults", request_serializer=None,
        response_deserializer=aggregator_pb2.SendLocalTaskResultsResponse.FromString)
