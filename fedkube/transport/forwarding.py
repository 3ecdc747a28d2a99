"""Calls relayed from a director's frontend process to the director process itself.

A frontend terminates the caller's connection (and its TLS), then relays each call it does
not answer itself, as bytes, over the director's private Unix socket. Under mTLS it sends
along who the caller proved to be (the certificate's CN and PEM); the director's private
server reads them through `ForwardedContext`, so its role table and identity checks run
unchanged. Nothing on the public port ever reads those headers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeAlias

import grpc

from fedkube.transport.identity import certificate_auth
from fedkube.transport.limits import MAX_REPLY_BYTES

CN_HEADER = "fedkube-forwarded-cn"
CERT_HEADER = "fedkube-forwarded-cert-bin"  # -bin: a PEM holds newlines
_NOT_RELAYED = frozenset({CN_HEADER, CERT_HEADER, "user-agent", "te", "content-type"})

# The private hop carries whatever the public port accepts, in both directions.
PRIVATE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_REPLY_BYTES),
    ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
]

Context = grpc.aio.ServicerContext[Any, Any]
Metadata = tuple[tuple[str, str | bytes], ...]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only
UnaryRelay = Callable[[bytes, Context], Awaitable[bytes]]


class ForwardedContext:
    """A servicer context whose auth context is the one the frontend saw on the caller's
    connection. Everything else is the private call's own context."""

    def __init__(self, context: Context) -> None:
        self._context = context
        cn = cert = None
        for key, value in context.invocation_metadata() or ():
            if key == CN_HEADER:
                cn = value.encode() if isinstance(value, str) else value
            elif key == CERT_HEADER:
                cert = value.encode() if isinstance(value, str) else value
        self._auth = certificate_auth(cn, cert)

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def relayed_metadata(context: Context) -> Metadata:
    """The caller's own headers, and under mTLS who its certificate says it is. Headers
    claiming an identity are the frontend's to set: a caller's are dropped."""
    kept: list[tuple[str, str | bytes]] = [
        (key, value) for key, value in context.invocation_metadata() or ()
        if key not in _NOT_RELAYED and not key.startswith((":", "grpc-"))]
    auth = context.auth_context()
    for key, header in (("x509_common_name", CN_HEADER), ("x509_pem_cert", CERT_HEADER)):
        values = list(auth.get(key) or ())
        if values:
            kept.append((header, values[0] if header.endswith("-bin") else values[0].decode()))
    return tuple(kept)


async def _relay_failure(error: grpc.aio.AioRpcError, context: Context) -> NoReturn:
    trailers: Any = error.trailing_metadata() or ()
    await context.abort(error.code(), error.details() or "", trailers)
    raise AssertionError("abort returns only by raising")  # for the type checker


def _relay_trailers(trailers: Any, context: Context) -> None:
    if trailers:
        context.set_trailing_metadata(tuple(trailers))


class Relay:
    """Builds handlers that pass a method's calls, as bytes, to the director process."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel

    def handler(self, method: str, *, request_streaming: bool,
                response_streaming: bool) -> Handler:
        raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
        if request_streaming and response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                _streamed_reply(self.channel.stream_stream(method, **raw)))
        if request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                _single_reply(self.channel.stream_unary(method, **raw)))
        if response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _streamed_reply(self.channel.unary_stream(method, **raw)))
        return grpc.unary_unary_rpc_method_handler(self.unary(method))

    def unary(self, method: str) -> UnaryRelay:
        """The relay of a unary method, for a handler that relays only some calls."""
        relay: UnaryRelay = _single_reply(self.channel.unary_unary(
            method, request_serializer=None, response_deserializer=None))
        return relay


def _single_reply(callable_: Any) -> Any:
    """A relay for a method with one reply; its request is bytes or, for a client
    stream, the caller's request iterator, passed on as it comes."""

    async def relay(request: Any, context: Context) -> bytes:
        call = callable_(request, metadata=relayed_metadata(context),
                         timeout=context.time_remaining())
        try:
            reply: bytes = await call
        except grpc.aio.AioRpcError as error:
            await _relay_failure(error, context)
        _relay_trailers(await call.trailing_metadata(), context)
        return reply

    return relay


def _streamed_reply(callable_: Any) -> Any:
    """The same for a method that streams its reply."""

    async def relay(request: Any, context: Context) -> AsyncIterator[bytes]:
        call = callable_(request, metadata=relayed_metadata(context),
                         timeout=context.time_remaining())
        try:
            async for reply in call:
                yield reply
        except grpc.aio.AioRpcError as error:
            await _relay_failure(error, context)
        _relay_trailers(await call.trailing_metadata(), context)

    return relay
