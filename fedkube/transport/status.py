"""Where fedkube's errors meet gRPC: the status code each service error ends a call with,
servicer decorators that apply it, and the codes a client may retry."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from fedkube.api import errors

R = TypeVar("R")
Context = grpc.aio.ServicerContext[Any, Any]

# The one table from error class to status code. A subclass takes its nearest listed base.
STATUS_CODES: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.InternalError: grpc.StatusCode.INTERNAL,
    errors.ServiceError: grpc.StatusCode.INTERNAL,
}

# Codes after which the same call may succeed later: the peer is down, restarting or busy
# (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED), or the connection broke mid-call
# (CANCELLED, and the UNKNOWN or INTERNAL that gRPC reports for a reset stream; fedkube's
# servicers never answer UNKNOWN themselves). Envoys and collaborators retry these, with
# backoff and a patience of their own; any other code is an answer.
TRANSIENT_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
})


def status_code(error: errors.ServiceError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def is_transient(exc: BaseException) -> bool:
    """A failed call worth trying again (see TRANSIENT_CODES)."""
    return isinstance(exc, grpc.RpcError) and exc.code() in TRANSIENT_CODES


def unary_errors(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """A ServiceError raised by a unary handler ends the call with its code and message."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> R:
        try:
            return await method(self, request, context)
        except errors.ServiceError as exc:
            await context.abort(status_code(exc), str(exc))
            raise  # unreachable: abort raises

    return wrapper


def stream_errors(method: Callable[..., AsyncIterator[R]]) -> Callable[..., AsyncIterator[R]]:
    """The same for handlers that stream their response."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> AsyncIterator[R]:
        try:
            async for item in method(self, request, context):
                yield item
        except errors.ServiceError as exc:
            await context.abort(status_code(exc), str(exc))

    return wrapper
