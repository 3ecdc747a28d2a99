"""Who may call what under mTLS: a role per certificate, a role table per RPC.

A certificate's role is its subject's organizational unit (OU), set by `fedkube certs` and
by the operator. Every RPC of the director's port is listed in `ROLE_TABLE`; a method not
listed is refused to everyone. The servicers then check identity within the role: an envoy
acts only for the shard named in its certificate, a collaborator only in experiments its
shard belongs to, a model owner sees only the experiments it submitted (an admin sees all).

A certificate gets its role only once its chain verifies against the CA, the same way on
every port (fedkube.transport.peer): the TLS handshakes alone do not agree on the rules.

Insecure mode has no certificates and so no roles: every call is allowed, as in OpenFL.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from fedkube.transport.peer import LEAF_KEY, auth_problem


class Role(enum.StrEnum):
    ADMIN = "admin"  # the operator, or a federation admin: every experiment
    OWNER = "owner"  # a model owner: submits experiments and reads its own
    ENVOY = "envoy"  # a shard's agent: registers, checks in, runs collaborators
    COLLABORATOR = "collaborator"  # a collaborator Pod: trains for its shard only
    DIRECTOR = "director"  # the server's own certificate; calls nothing but Health


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
    "/fedkube.streaming.TensorStream/StreamAggregatedTensor": _TRAINING,
    "/fedkube.streaming.TensorStream/BulkEndpoint": _TRAINING,
    # A shard's review of an experiment dispatched to it: its envoy's, never its
    # collaborator's (the experiment's own code must not approve itself).
    "/fedkube.review.Review/Describe": frozenset({Role.ENVOY}),
    "/fedkube.review.Review/Decide": frozenset({Role.ENVOY}),
    # The standard health protocol tells only whether the director serves: open to every
    # role. (A kubelet's probe has no certificate at all; it uses the director's plaintext
    # health port, which serves nothing else: fedkube.director.server.)
    **{f"/grpc.health.v1.Health/{method}": frozenset(Role)
       for method in ("Check", "Watch", "List")},
}


@functools.lru_cache(maxsize=4096)
def role_of_certificate(pem: bytes) -> Role | None:
    """The role in a certificate's OU, or None unless it names exactly one we know: a
    certificate with two roles gets neither (the first OU won, and one RDN holding two
    OUs sorts them, so `admin` could win over the role it was issued for)."""
    cert = x509.load_pem_x509_certificate(pem)
    roles = set()
    for attribute in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
        try:
            roles.add(Role(str(attribute.value)))
        except ValueError:
            continue
    return roles.pop() if len(roles) == 1 else None


def verified_role(auth: Mapping[str, Iterable[bytes]]) -> tuple[Role | None, str | None]:
    """The role of an auth context's certificate, and why it has none when its chain does
    not verify (fedkube.transport.peer)."""
    certs = list(auth.get(LEAF_KEY) or ())
    if not certs:
        return None, None
    problem = auth_problem(auth)
    if problem is not None:
        return None, problem
    return role_of_certificate(certs[0]), None


def caller_role(context: grpc.aio.ServicerContext[Any, Any]) -> Role | None:
    return verified_role(context.auth_context())[0]


def is_admin(context: grpc.aio.ServicerContext[Any, Any], *, tls: bool) -> bool:
    return tls and caller_role(context) is Role.ADMIN


def refusal(method: str, role: Role | None) -> str | None:
    """Why a caller of this role may not call method, or None when it may."""
    allowed = ROLE_TABLE.get(method)
    if allowed is None:
        return f"{method} is not open to any caller"
    if role is None:
        return (f"the client certificate has no single fedkube role (its OU must be "
                f"exactly one of {', '.join(r.value for r in Role)}); issue it with "
                f"`fedkube certs`")
    if role not in allowed:
        return (f"role {role.value!r} may not call {method.rsplit('/', 1)[-1]} (allowed: "
                f"{', '.join(sorted(r.value for r in allowed))})")
    return None
