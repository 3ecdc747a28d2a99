"""What every call to the director's port passes before its handler: the role table (under
mTLS) and a clear INVALID_ARGUMENT for request bytes that do not parse.

grpc.aio answers a request that fails to deserialize with UNKNOWN and the parser's
exception text; here the deserializer returns a marker instead and the wrapped handler
refuses it by name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from fedkube.transport.roles import caller_role, refusal


class Malformed:
    """Stands in for a request message whose bytes did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or anything a custom parser raises
            return Malformed(exc)

    return parse


class GuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, *, check_roles: bool) -> None:
        self.check_roles = check_roles

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        return _guarded(handler, details.method, self.check_roles)  # type: ignore[attr-defined]


async def _refuse_malformed(request: Any, method: str, context: Any) -> None:
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"malformed {method.rsplit('/', 1)[-1]} request: {request.error}")


async def _checked_stream(requests: AsyncIterator[Any], method: str,
                          context: Any) -> AsyncIterator[Any]:
    async for request in requests:
        await _refuse_malformed(request, method, context)
        yield request


def _guarded(handler: Any, method: str, check_roles: bool) -> Any:
    """The same handler with the checks in front of its behaviour."""

    async def admit(context: Any) -> None:
        if check_roles:
            reason = refusal(method, caller_role(context))
            if reason is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)

    codec = {"request_deserializer": _lenient(handler.request_deserializer),
             "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def guarded_unary_unary(request: Any, context: Any) -> Any:
            await admit(context)
            await _refuse_malformed(request, method, context)
            return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(guarded_unary_unary, **codec)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def guarded_stream_unary(requests: Any, context: Any) -> Any:
            await admit(context)
            return await stream_unary(_checked_stream(requests, method, context), context)

        return grpc.stream_unary_rpc_method_handler(guarded_stream_unary, **codec)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        async def guarded_unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            await admit(context)
            await _refuse_malformed(request, method, context)
            async for item in unary_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(guarded_unary_stream, **codec)
    stream_stream = handler.stream_stream

    async def guarded_stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        await admit(context)
        async for item in stream_stream(_checked_stream(requests, method, context), context):
            yield item

    return grpc.stream_stream_rpc_method_handler(guarded_stream_stream, **codec)
