"""Servicer decorators that turn the error taxonomy (fedkube.api.errors) into gRPC statuses."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from fedkube.api.errors import DirectorError

R = TypeVar("R")
Context = grpc.aio.ServicerContext[Any, Any]


def unary_errors(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """A DirectorError raised by a unary handler ends the call with its code and message."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> R:
        try:
            return await method(self, request, context)
        except DirectorError as exc:
            await context.abort(exc.code, str(exc))
            raise  # unreachable: abort raises

    return wrapper


def stream_errors(method: Callable[..., AsyncIterator[R]]) -> Callable[..., AsyncIterator[R]]:
    """The same for handlers that stream their response."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> AsyncIterator[R]:
        try:
            async for item in method(self, request, context):
                yield item
        except DirectorError as exc:
            await context.abort(exc.code, str(exc))

    return wrapper
