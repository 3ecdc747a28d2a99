"""One check of a client's certificate chain, the same on every port that grants roles.

The TLS stacks in front of fedkube's ports disagree: BoringSSL (grpcio, the gRPC port)
ignores a CA's pathLenConstraint, which OpenSSL (Python's ssl, the bulk port) enforces, so
a leaf issued through an intermediate below a `pathlen:0` CA got its role on one port and
was refused on the other. And the frontends' private hop has no TLS at all: the director
read the PEM its frontend forwarded. So a role is granted only to a certificate that this
module verified: RFC 5280 path validation (`cryptography.x509.verification`) from the leaf,
through the intermediates its peer presented, to the CA, with the stricter of the stacks'
rules, wherever the TLS ended:

- every CA on the path (the anchor too): basicConstraints CA=true, critical, its path
  length respected, keyUsage with keyCertSign, valid now;
- the leaf: not a CA, valid now, clientAuth among its extended key usages if it lists any,
  no unknown critical extension (the web PKI profile, less what fedkube's own certificates
  and those of a Kubernetes signer lack: an authority key identifier on every
  certificate, a subjectAltName on a client's).

Where intermediates come from: on the gRPC port its auth context's `x509_pem_cert_chain`
(what the peer presented, besides its leaf); on the bulk port the TLS connection's
unverified chain; on the private hop what the frontend forwarded of those. A resumed TLS
session keeps only the leaf: a leaf verified once with its intermediates is remembered
(the verdict is the leaf's, whoever presents it; TLS proved the key).

The CA: on the gRPC port and the private hop, those this process's mTLS servers require
client certificates to chain to (`trust`, called by fedkube.transport.tls for each server
it builds); on the bulk port its own. (A process serving two federations' CAs, as a test
run does, accepts either's chains here: on a TLS port its handshake has already held the
peer to that port's own CA, and on the private hop only a call that proves it came from
a frontend of that process gets this far: fedkube.transport.forwarding.)

Verdicts are cached per leaf, intermediates and CA (a health check every few seconds per
envoy costs a dictionary lookup, not a verification); the end of the path's validity is
checked on every call.
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

LEAF_KEY = "x509_pem_cert"  # the auth context's keys, as grpc names them
CHAIN_KEY = "x509_pem_cert_chain"  # the intermediates the peer presented (PEM)
REMEMBERED = 4096  # leaves, as many as fedkube.transport.roles caches

_CA_POLICY = ExtensionPolicy.webpki_defaults_ca().may_be_present(
    x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
_EE_POLICY = (ExtensionPolicy.webpki_defaults_ee()
              .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
              .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None))

_lock = threading.Lock()
_trusted: set[bytes] = set()
_anchors = b""  # the trusted CAs as one PEM bundle: one object, its hash computed once


def trust(ca_pem: bytes) -> None:
    """Adds a CA (PEM, one or more certificates) that client certificates may chain to."""
    global _anchors
    with _lock:
        if ca_pem not in _trusted:
            _trusted.add(ca_pem)
            _anchors = b"".join(sorted(_trusted))


def anchors() -> bytes:
    return _anchors


@dataclass(frozen=True)
class _Verdict:
    problem: str | None
    expires: float = 0.0  # the earliest end of validity on the path (a POSIX time)


def _subject(leaf: x509.Certificate) -> str:
    return leaf.subject.rfc4514_string() or "with an empty subject"


_remembered: dict[tuple[bytes, bytes], float] = {}  # (leaf, CA): verified, expires


def _remember(leaf_pem: bytes, ca_pem: bytes, expires: float) -> None:
    with _lock:
        if len(_remembered) >= REMEMBERED:
            del _remembered[next(iter(_remembered))]  # the oldest
        _remembered[(leaf_pem, ca_pem)] = expires


@functools.lru_cache(maxsize=REMEMBERED)
def _verify(leaf_pem: bytes, intermediates_pem: bytes, ca_pem: bytes) -> _Verdict:
    try:
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        intermediates = (x509.load_pem_x509_certificates(intermediates_pem)
                         if intermediates_pem.strip() else [])
    except ValueError as exc:
        return _Verdict(f"the client certificate is not a readable PEM certificate: {exc}")
    try:
        roots = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        return _Verdict(f"the CA to check client certificates against is unreadable: {exc}")
    verifier = (PolicyBuilder().store(Store(roots)).time(dt.datetime.now(dt.UTC))
                .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
                .build_client_verifier())
    try:
        chain = verifier.verify(leaf, intermediates).chain
    except VerificationError as exc:
        reason = str(exc)
        if reason.endswith("with no interior errors"):  # no issuer found at all
            reason = "it is not issued by the CA, nor through an intermediate it presented"
        return _Verdict(f"the client certificate {_subject(leaf)} does not verify "
                        f"against this server's CA: {reason}")
    expires = min(cert.not_valid_after_utc for cert in chain).timestamp()
    _remember(leaf_pem, ca_pem, expires)
    return _Verdict(None, expires)


def chain_problem(leaf_pem: bytes, intermediates_pem: bytes = b"",
                  ca_pem: bytes | None = None) -> str | None:
    """Why a client certificate (PEM), with the intermediates its peer presented (PEM,
    concatenated), gets no role; None when it verifies. `ca_pem`: the CA to verify
    against; by default those of `trust`."""
    ca = _anchors if ca_pem is None else ca_pem
    if not ca:
        return "this server has no CA to verify client certificates against"
    verdict = _verify(leaf_pem, intermediates_pem, ca)
    expires = verdict.expires
    if verdict.problem is not None:
        # A resumed TLS session has its leaf only: it counts if it verified before.
        remembered = None if intermediates_pem else _remembered.get((leaf_pem, ca))
        if remembered is None:
            return verdict.problem
        expires = remembered
    if time.time() > expires:  # cached verdicts outlive validity: checked on every call
        return (f"the client certificate's chain expired at "
                f"{dt.datetime.fromtimestamp(expires, dt.UTC):%Y-%m-%d %H:%M:%S} UTC")
    return None


def auth_problem(auth: Mapping[str, Iterable[bytes]],
                 ca_pem: bytes | None = None) -> str | None:
    """chain_problem for the certificate in an auth context (as grpc gives it); None for
    one with no certificate, which gets no role anyway."""
    leaves = list(auth.get(LEAF_KEY) or ())
    if not leaves:
        return None
    return chain_problem(leaves[0], b"".join(auth.get(CHAIN_KEY) or ()), ca_pem)


@functools.lru_cache(maxsize=REMEMBERED)
def common_name(pem: bytes) -> bytes | None:
    """A certificate's (first) CN, as grpc's auth context has it: for callers whose TLS
    ended elsewhere, read from the certificate rather than taken from a header."""
    names = x509.load_pem_x509_certificate(pem).subject.get_attributes_for_oid(
        NameOID.COMMON_NAME)
    return str(names[0].value).encode() if names else None
