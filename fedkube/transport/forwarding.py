"""Calls relayed from a director's frontend process to the director process itself.

A frontend terminates the caller's connection (and its TLS), then relays each call it does
not answer itself, as bytes, over the director's private Unix socket. Under mTLS it sends
along who the caller proved to be (the certificate's PEM and the intermediates it
presented); the director's private server reads them through `ForwardedContext`, so its
role table and identity checks run unchanged. Nothing on the public port ever reads those
headers.

The socket grants nothing by itself (its directory keeps out other users, not another
process of the same one): every relayed call carries the secret that the director handed
its frontends at spawn (`new_frontend_secret`, on their stdin), and a forwarded
certificate counts only once its chain verifies against the CA (fedkube.transport.peer),
so a certificate made by whoever reached the socket gets no role; the identity is the
verified certificate's CN, never a header's.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeAlias

import grpc

from fedkube.transport.identity import certificate_auth
from fedkube.transport.limits import MAX_REPLY_BYTES
from fedkube.transport.peer import CHAIN_KEY, LEAF_KEY, chain_problem, common_name

CN_HEADER = "fedkube-forwarded-cn"  # no longer sent (the CN is read from the certificate)
CERT_HEADER = "fedkube-forwarded-cert-bin"  # -bin: a PEM holds newlines
CHAIN_HEADER = "fedkube-forwarded-chain-bin"  # the intermediates the caller presented
SECRET_HEADER = "fedkube-frontend-secret"
_NOT_RELAYED = frozenset({CN_HEADER, CERT_HEADER, CHAIN_HEADER, SECRET_HEADER, "user-agent",
                          "te", "content-type"})

# The private hop carries whatever the public port accepts, in both directions.
PRIVATE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_REPLY_BYTES),
    ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
]

Context = grpc.aio.ServicerContext[Any, Any]
Metadata = tuple[tuple[str, str | bytes], ...]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only
UnaryRelay = Callable[[bytes, Context], Awaitable[bytes]]


_secrets_lock = threading.Lock()
_frontend_secrets: tuple[str, ...] = ()  # one per live Frontends (a director's pool)


def new_frontend_secret() -> str:
    """A secret for one director's frontends to prove their relayed calls with."""
    global _frontend_secrets
    secret = secrets.token_hex(32)
    with _secrets_lock:
        _frontend_secrets = (*_frontend_secrets, secret)
    return secret


def forget_frontend_secret(secret: str) -> None:
    global _frontend_secrets
    with _secrets_lock:
        _frontend_secrets = tuple(s for s in _frontend_secrets if s != secret)


def is_frontend_secret(secret: str | bytes | None) -> bool:
    if not secret:
        return False
    given = secret.encode() if isinstance(secret, str) else secret
    # Every live secret compared, in constant time each.
    return any([hmac.compare_digest(given, s.encode()) for s in _frontend_secrets])


def frontend_metadata(secret: str) -> Metadata:
    """What a frontend's own calls to the director (its reports) carry."""
    return ((SECRET_HEADER, secret),)


class ForwardedContext:
    """A servicer context whose auth context is the one the frontend saw on the caller's
    connection, once checked: `refusal` says why a call gets no identity at all (not from
    a frontend, or a certificate that does not verify), and then the auth context is
    empty. Everything else is the private call's own context."""

    def __init__(self, context: Context) -> None:
        self._context = context
        cert = chain = secret = None
        for key, value in context.invocation_metadata() or ():
            if key == CERT_HEADER:
                cert = value.encode() if isinstance(value, str) else value
            elif key == CHAIN_HEADER:
                chain = value.encode() if isinstance(value, str) else value
            elif key == SECRET_HEADER:
                secret = value
        self._auth: dict[str, list[bytes]] = {}
        self.refusal: str | None = None
        if not is_frontend_secret(secret):
            self.refusal = ("the call did not come through one of this director's "
                            "frontends (no valid frontend secret): its private socket "
                            "grants nothing by itself")
        elif cert is not None:
            self.refusal = chain_problem(cert, chain or b"")
            if self.refusal is None:
                self._auth = certificate_auth(common_name(cert), cert)
                if chain:
                    self._auth[CHAIN_KEY] = [chain]

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def relayed_metadata(context: Context, secret: str) -> Metadata:
    """The caller's own headers, the frontend's secret, and under mTLS the certificate the
    caller presented, with its intermediates. Headers claiming an identity are the
    frontend's to set: a caller's are dropped."""
    kept: list[tuple[str, str | bytes]] = [
        (key, value) for key, value in context.invocation_metadata() or ()
        if key not in _NOT_RELAYED and not key.startswith((":", "grpc-"))]
    kept.append((SECRET_HEADER, secret))
    auth = context.auth_context()
    for key, header in ((LEAF_KEY, CERT_HEADER), (CHAIN_KEY, CHAIN_HEADER)):
        values = b"".join(auth.get(key) or ())
        if values:
            kept.append((header, values))
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

    def __init__(self, channel: grpc.aio.Channel, secret: str) -> None:
        self.channel = channel
        self.secret = secret  # the director's, for every relayed call

    def handler(self, method: str, *, request_streaming: bool,
                response_streaming: bool) -> Handler:
        raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
        if request_streaming and response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                _streamed_reply(self.channel.stream_stream(method, **raw), self.secret))
        if request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                _single_reply(self.channel.stream_unary(method, **raw), self.secret))
        if response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _streamed_reply(self.channel.unary_stream(method, **raw), self.secret))
        return grpc.unary_unary_rpc_method_handler(self.unary(method))

    def unary(self, method: str) -> UnaryRelay:
        """The relay of a unary method, for a handler that relays only some calls."""
        relay: UnaryRelay = _single_reply(self.channel.unary_unary(
            method, request_serializer=None, response_deserializer=None), self.secret)
        return relay


def _single_reply(callable_: Any, secret: str) -> Any:
    """A relay for a method with one reply; its request is bytes or, for a client
    stream, the caller's request iterator, passed on as it comes."""

    async def relay(request: Any, context: Context) -> bytes:
        call = callable_(request, metadata=relayed_metadata(context, secret),
                         timeout=context.time_remaining())
        try:
            reply: bytes = await call
        except grpc.aio.AioRpcError as error:
            await _relay_failure(error, context)
        _relay_trailers(await call.trailing_metadata(), context)
        return reply

    return relay


def _streamed_reply(callable_: Any, secret: str) -> Any:
    """The same for a method that streams its reply."""

    async def relay(request: Any, context: Context) -> AsyncIterator[bytes]:
        call = callable_(request, metadata=relayed_metadata(context, secret),
                         timeout=context.time_remaining())
        try:
            async for reply in call:
                yield reply
        except grpc.aio.AioRpcError as error:
            await _relay_failure(error, context)
        _relay_trailers(await call.trailing_metadata(), context)

    return relay
