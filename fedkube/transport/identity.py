"""Who is calling: the client certificate's CN under mTLS, the `client_id` header otherwise;
and who owns what it submits, its (role, CN).

The header is what OpenFL 1.6 clients send in insecure mode; it proves nothing and is used
for bookkeeping only.
"""

from __future__ import annotations

from typing import Any

import grpc

from fedkube.transport.roles import caller_role

CLIENT_ID_HEADER = "client_id"
ANONYMOUS = "__default__"  # OpenFL's CLIENT_ID_DEFAULT
# Trailing metadata with the reason a shard was refused (UpdateShardInfo has no field).
REASON_HEADER = "fedkube-reason"


def certificate_auth(common_name: bytes | None, pem: bytes | None) -> dict[str, list[bytes]]:
    """An auth context as grpc gives it for a client certificate (the keys read below and
    by fedkube.transport.roles), for callers whose TLS ended elsewhere."""
    auth: dict[str, list[bytes]] = {}
    if common_name is not None:
        auth["x509_common_name"] = [common_name]
    if pem is not None:
        auth["x509_pem_cert"] = [pem]
    return auth


def caller_identity(context: grpc.aio.ServicerContext[Any, Any], *, tls: bool) -> str:
    if tls:
        names = list(context.auth_context().get("x509_common_name") or ())
        return names[0].decode() if names else ANONYMOUS
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_ID_HEADER:
            return value if isinstance(value, str) else value.decode()
    return ANONYMOUS


def caller_principal(context: grpc.aio.ServicerContext[Any, Any], *, tls: bool) -> str:
    """Who owns what a caller submits: under mTLS its role and CN (`owner:alice`), so an
    admin named alice and the owner alice are two principals; the client_id otherwise."""
    name = caller_identity(context, tls=tls)
    if not tls:
        return name
    role = caller_role(context)
    return f"{role.value}:{name}" if role is not None else name


def acting_for_another(caller: str, claimed: str) -> str:
    """Why a caller may not act for another shard: one message wherever it is checked."""
    return f"caller {caller!r} may not act for {claimed!r}"
