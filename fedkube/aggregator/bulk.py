"""The aggregators' side of fedkube.transport.bulk: its server threads hand each request to
the director's event loop, where the same checks and work run as for the gRPC streams."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from fedkube.aggregator.servicer import AggregatorService
from fedkube.api.errors import ServiceError
from fedkube.proto import aggregator_pb2
from fedkube.transport.bulk import BulkError, PeerContext, Segments
from fedkube.transport.status import status_code

T = TypeVar("T")


class AggregatorBulkHandler:
    def __init__(self, service: AggregatorService, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.loop = loop

    def _on_loop(self, work: Callable[[], Awaitable[T]]) -> T:
        async def run() -> T:
            return await work()

        try:
            return asyncio.run_coroutine_threadsafe(run(), self.loop).result()
        except ServiceError as exc:
            raise BulkError(status_code(exc), str(exc)) from exc

    @staticmethod
    def _parse(message: Any, data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            raise BulkError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"malformed bulk request header: {exc}") from exc

    def download(self, context: PeerContext, header: bytes) -> Segments:
        request = self._parse(aggregator_pb2.GetAggregatedTensorRequest, header)
        return self._on_loop(lambda: self.service.bulk_download(request, context))  # type: ignore[arg-type]

    def upload_limit(self, context: PeerContext, header: bytes) -> int:
        message = self._parse(aggregator_pb2.MessageHeader, header)
        return self._on_loop(lambda: self.service.bulk_upload_limit(message, context))  # type: ignore[arg-type]

    def upload(self, context: PeerContext, header: bytes, body: memoryview) -> bytes:
        message = self._parse(aggregator_pb2.MessageHeader, header)
        reply = self._on_loop(lambda: self.service.bulk_upload(message, body, context))  # type: ignore[arg-type]
        return reply.SerializeToString()
