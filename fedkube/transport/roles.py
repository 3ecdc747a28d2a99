"""Who may call what under mTLS: a role per certificate, a role table per RPC.

A certificate's role is its subject's organizational unit (OU), set by `fedkube certs` and
by the operator. Every RPC of the director's port is listed in `ROLE_TABLE`; a method not
listed is refused to everyone. The servicers then check identity within the role: an envoy
acts only for the shard named in its certificate, a collaborator only in experiments its
shard belongs to, a model owner sees only the experiments it submitted (an admin sees all).

Insecure mode has no certificates and so no roles: every call is allowed, as in OpenFL.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID


class Role(enum.StrEnum):
    ADMIN = "admin"  # the operator, or a federation admin: every experiment
    OWNER = "owner"  # a model owner: submits experiments and reads its own
    ENVOY = "envoy"  # a shard's agent: registers, checks in, runs collaborators
    COLLABORATOR = "collaborator"  # a collaborator Pod: trains for its shard only
    DIRECTOR = "director"  # the server's own certificate; calls nothing


_OWNERS = frozenset({Role.OWNER, Role.ADMIN})
_TRAINING = frozenset({Role.ENVOY, Role.COLLABORATOR})  # OpenFL runs collaborators with
# the envoy's own certificate, so an envoy may speak the aggregator's protocol too.

_DIRECTOR = "/openfl.director.Director/"
_AGGREGATOR = "/openfl.aggregator.Aggregator/"
ROLE_TABLE: dict[str, frozenset[Role]] = {
    _DIRECTOR + "UpdateShardInfo": frozenset({Role.ENVOY}),
    _DIRECTOR + "UpdateEnvoyStatus": frozenset({Role.ENVOY}),
    _DIRECTOR + "WaitExperiment": frozenset({Role.ENVOY}),
    _DIRECTOR + "GetExperimentData": _TRAINING,
    _DIRECTOR + "SetExperimentFailed": frozenset({Role.ENVOY}),
    _DIRECTOR + "SetNewExperiment": _OWNERS,
    _DIRECTOR + "GetExperimentsList": _OWNERS,
    _DIRECTOR + "GetExperimentDescription": _OWNERS,
    _DIRECTOR + "GetExperimentStatus": _OWNERS,
    _DIRECTOR + "GetTrainedModel": _OWNERS,
    _DIRECTOR + "GetMetricStream": _OWNERS,
    _DIRECTOR + "RemoveExperimentData": _OWNERS,
    _DIRECTOR + "GetEnvoys": _OWNERS,
    _DIRECTOR + "GetDatasetInfo": _OWNERS | {Role.ENVOY},
    _AGGREGATOR + "GetTasks": _TRAINING,
    _AGGREGATOR + "GetAggregatedTensor": _TRAINING,
    _AGGREGATOR + "SendLocalTaskResults": _TRAINING,
}


@functools.lru_cache(maxsize=4096)
def role_of_certificate(pem: bytes) -> Role | None:
    """The role in a certificate's OU, or None when it has none we know."""
    cert = x509.load_pem_x509_certificate(pem)
    for attribute in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
        try:
            return Role(str(attribute.value))
        except ValueError:
            continue
    return None


def caller_role(context: grpc.aio.ServicerContext[Any, Any]) -> Role | None:
    certs = list(context.auth_context().get("x509_pem_cert") or ())
    return role_of_certificate(certs[0]) if certs else None


def is_admin(context: grpc.aio.ServicerContext[Any, Any], *, tls: bool) -> bool:
    return tls and caller_role(context) is Role.ADMIN


def refusal(method: str, role: Role | None) -> str | None:
    """Why a caller of this role may not call method, or None when it may."""
    allowed = ROLE_TABLE.get(method)
    if allowed is None:
        return f"{method} is not open to any caller"
    if role is None:
        return (f"the client certificate has no fedkube role (its OU must be one of "
                f"{', '.join(r.value for r in Role)}); issue it with `fedkube certs`")
    if role not in allowed:
        return (f"role {role.value!r} may not call {method.rsplit('/', 1)[-1]} (allowed: "
                f"{', '.join(sorted(r.value for r in allowed))})")
    return None


class RoleInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks the role table before any handler runs (mTLS servers only)."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        return _guarded(handler, details.method)  # type: ignore[attr-defined]


async def _check(method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    reason = refusal(method, caller_role(context))
    if reason is not None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)


def _guarded(handler: Any, method: str) -> Any:
    """The same handler, with the role check in front of its behaviour."""
    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def guarded_unary_unary(request: Any, context: Any) -> Any:
            await _check(method, context)
            return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(guarded_unary_unary, **codec)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def guarded_stream_unary(requests: Any, context: Any) -> Any:
            await _check(method, context)
            return await stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(guarded_stream_unary, **codec)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        async def guarded_unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            await _check(method, context)
            async for item in unary_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(guarded_unary_stream, **codec)
    stream_stream = handler.stream_stream

    async def guarded_stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        await _check(method, context)
        async for item in stream_stream(requests, context):
            yield item

    return grpc.stream_stream_rpc_method_handler(guarded_stream_stream, **codec)
