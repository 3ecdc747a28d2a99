"""Which shard certificates the operator signs: a pure review of a Kubernetes
CertificateSigningRequest.

An envoy (or a collaborator Pod) proves which node it runs on with the token of its Pod:
the apiserver copies the node bound into that token into the request's
`spec.extra["authentication.kubernetes.io/node-name"]`, and nobody can forge it. The
operator signs CN=<shard>, OU=<role> only when the requester is the federation's envoy
(or collaborator) service account and runs on the node the Shard names. So one shard's
envoy cannot pose as another's, although all envoys of a federation share an account.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from fedkube.api.resources import ShardSpec
from fedkube.operator.manifests import names
from fedkube.transport import certs

NODE_NAME = "authentication.kubernetes.io/node-name"
POD_NAME = "authentication.kubernetes.io/pod-name"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
ALLOWED_USAGES = {"client auth", "digital signature", "key encipherment"}
MIN_VALIDITY = dt.timedelta(minutes=10)


def service_accounts(federation: str) -> dict[str, str]:
    """The role each of a federation's service accounts may request."""
    accounts = names(federation)
    return {accounts.envoy: "envoy", accounts.collaborator: "collaborator"}


@dataclass(frozen=True)
class Requester:
    namespace: str
    federation: str
    role: str


@dataclass(frozen=True)
class Review:
    approved: bool
    reason: str
    message: str
    request: x509.CertificateSigningRequest | None = None
    validity: dt.timedelta = certs.VALIDITY


def _service_account(username: str) -> tuple[str, str] | None:
    """(namespace, account) of a service account's user name; None for other users."""
    if not username.startswith(SERVICE_ACCOUNT_PREFIX):
        return None
    namespace, _, account = username.removeprefix(SERVICE_ACCOUNT_PREFIX).partition(":")
    return namespace, account


def account_namespace(username: str) -> str | None:
    """The namespace of a service account's user name; None for other users."""
    parsed = _service_account(username)
    return parsed[0] if parsed else None


def find_requester(username: str, federations: Iterable[tuple[str, str]]
                   ) -> Requester | None:
    """The federation and role of a service-account user name, among (namespace, name)
    federations; None when the account belongs to none of them."""
    parsed = _service_account(username)
    if parsed is None:
        return None
    namespace, account = parsed
    for fed_namespace, federation in federations:
        role = service_accounts(federation).get(account)
        if fed_namespace == namespace and role is not None:
            return Requester(namespace, federation, role)
    return None


def is_decided(status: dict[str, Any]) -> bool:
    return bool(status.get("certificate")) or any(
        c.get("type") in ("Approved", "Denied", "Failed") for c in status.get("conditions", []))


def _deny(reason: str, message: str) -> Review:
    return Review(False, reason, message)


def review_request(spec: dict[str, Any], requester: Requester | None,
                   shards: dict[str, ShardSpec]) -> Review:
    """Approve or deny, with the reason Kubernetes shows on the request. `shards` are the
    Shards of the requester's namespace."""
    username = str(spec.get("username", ""))
    if requester is None:
        return _deny("UnknownRequester", f"{username!r} is not the envoy or collaborator "
                     "service account of a federation")
    extra = spec.get("extra") or {}
    nodes, pods = extra.get(NODE_NAME) or [], extra.get(POD_NAME) or []
    if len(nodes) != 1 or len(pods) != 1:
        return _deny("NotBoundToPod", "the request was not made with a Pod's service-account "
                     "token, so the node it comes from is unknown")
    node = nodes[0]
    usages = set(spec.get("usages") or [])
    if not usages or not usages <= ALLOWED_USAGES:
        return _deny("BadUsages", f"usages must be within {sorted(ALLOWED_USAGES)}, got "
                     f"{sorted(usages)}")
    try:
        subject, request = certs.read_request(base64.b64decode(spec.get("request", ""),
                                                               validate=True))
    except (certs.BadRequest, binascii.Error) as exc:
        return _deny("BadRequest", str(exc))
    if subject.role != requester.role:
        return _deny("WrongRole", f"service account of role {requester.role!r} asked for "
                     f"OU={subject.role!r}")
    shard = shards.get(subject.common_name)
    if shard is None or shard.federation != requester.federation:
        return _deny("UnknownShard", f"no Shard {subject.common_name!r} of federation "
                     f"{requester.federation!r} in namespace {requester.namespace!r}")
    if shard.node_name != node:
        return _deny("WrongNode", f"shard {subject.common_name!r} is on node "
                     f"{shard.node_name or '(none)'!r}; the request comes from Pod "
                     f"{pods[0]!r} on node {node!r}")
    validity = certs.VALIDITY
    if spec.get("expirationSeconds"):
        validity = max(MIN_VALIDITY, min(validity,
                                         dt.timedelta(seconds=int(spec["expirationSeconds"]))))
    return Review(True, "ShardNodeVerified",
                  f"{requester.role} of shard {subject.common_name!r}, from Pod {pods[0]!r} on "
                  f"its node {node!r}", request=request, validity=validity)
