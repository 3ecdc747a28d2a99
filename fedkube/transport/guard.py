"""What every call to the director's port passes before its handler: under mTLS the client
certificate's chain, verified against the CA (fedkube.transport.peer: UNAUTHENTICATED
when it does not), and the role table; on the private hop, proof that a frontend relayed
the call; a clear INVALID_ARGUMENT for request bytes that do not parse.

grpc.aio answers a request that fails to deserialize with UNKNOWN and the parser's
exception text; here the deserializer returns a marker instead and the wrapped handler
refuses it by name. The handlers are wrapped once, when the services are registered: a
grpc.aio server interceptor runs per call and cost the health-check path about 15 % more
CPU (benchmarks/health_checks.py at 2,000 calls/s).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from fedkube.transport.forwarding import ForwardedContext
from fedkube.transport.roles import refusal, verified_role

Handlers = dict[str, Any]  # method name -> grpc.RpcMethodHandler


def _same(context: Any) -> Any:
    return context


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


class _Registrations:
    """Stands in for a server to collect the handlers that generated code registers."""

    handlers: Handlers

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: Handlers) -> None:
        self.handlers = dict(handlers)


def generated_handlers(add_to_server: Callable[[Any, Any], None], servicer: Any) -> Handlers:
    """The method handlers that a generated add_XServicer_to_server would register."""
    registrations = _Registrations()
    add_to_server(servicer, registrations)
    return registrations.handlers


def add_guarded_service(server: grpc.aio.Server, service: str, handlers: Handlers, *,
                        check_roles: bool, forwarded: bool = False) -> None:
    """Registers a service's handlers, each wrapped with the checks. `forwarded`: the
    server is the director's private one, whose callers are its frontends, and a call's
    identity is the one its frontend forwarded (fedkube.transport.forwarding)."""
    guarded = guarded_handlers(service, handlers, check_roles=check_roles,
                               forwarded=forwarded)
    # As generated code registers them: the registered-method fast path, and a fallback.
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, guarded)])
    server.add_registered_method_handlers(service, guarded)  # type: ignore[attr-defined]


def guarded_handlers(service: str, handlers: Handlers, *, check_roles: bool,
                     forwarded: bool = False) -> Handlers:
    return {name: _guarded(handler, f"/{service}/{name}", check_roles, forwarded)
            for name, handler in handlers.items()}


async def _abort_malformed(request: Malformed, method: str, context: Any) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"malformed {method.rsplit('/', 1)[-1]} request: {request.error}")


async def _checked_stream(requests: AsyncIterator[Any], method: str,
                          context: Any) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            await _abort_malformed(request, method, context)
        yield request


def _guarded(handler: Any, method: str, check_roles: bool, forwarded: bool) -> Any:
    """The same handler with the checks in front of its behaviour."""
    context_of: Callable[[Any], Any] = ForwardedContext if forwarded else _same
    checked = check_roles or forwarded  # a relayed call proves its frontend in any mode

    async def admit(context: Any) -> None:
        if forwarded and context.refusal is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, context.refusal)
        if not check_roles:
            return
        # One auth context read: the health-check path comes through here.
        role, problem = verified_role(context.auth_context())
        if problem is not None:  # a chain the handshake let through: no role at all
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        reason = refusal(method, role)
        if reason is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)

    codec = {"request_deserializer": _lenient(handler.request_deserializer),
             "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def guarded_unary_unary(request: Any, context: Any) -> Any:
            context = context_of(context)
            if checked:
                await admit(context)
            if isinstance(request, Malformed):
                await _abort_malformed(request, method, context)
            return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(guarded_unary_unary, **codec)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def guarded_stream_unary(requests: Any, context: Any) -> Any:
            context = context_of(context)
            if checked:
                await admit(context)
            return await stream_unary(_checked_stream(requests, method, context), context)

        return grpc.stream_unary_rpc_method_handler(guarded_stream_unary, **codec)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream
        if inspect.iscoroutinefunction(unary_stream):
            # A handler that writes its replies (context.write), as grpc_health's Watch
            # does, rather than yields them: grpc.aio tells the two apart by their kind.
            async def guarded_writer(request: Any, context: Any) -> None:
                context = context_of(context)
                if checked:
                    await admit(context)
                if isinstance(request, Malformed):
                    await _abort_malformed(request, method, context)
                await unary_stream(request, context)

            return grpc.unary_stream_rpc_method_handler(guarded_writer, **codec)

        async def guarded_unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            context = context_of(context)
            if checked:
                await admit(context)
            if isinstance(request, Malformed):
                await _abort_malformed(request, method, context)
            async for item in unary_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(guarded_unary_stream, **codec)
    stream_stream = handler.stream_stream

    async def guarded_stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        context = context_of(context)
        if checked:
            await admit(context)
        async for item in stream_stream(_checked_stream(requests, method, context), context):
            yield item

    return grpc.stream_stream_rpc_method_handler(guarded_stream_stream, **codec)
