"""A certificate authority and leaf certificates for mTLS, made with `cryptography`.

The CN of a leaf is the identity the director sees: an envoy's certificate carries its
shard name, a model owner's its user name, the director's its host name. The OU is the
role (admin, owner, envoy, collaborator, director) that the director's role table checks.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(common_name: str = "fedkube-ca") -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _subject(common_name: str, *, organization: str | None = None,
             role: str | None = None) -> x509.Name:
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if role:
        subject.insert(0, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    if organization:
        subject.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(subject)


def _sign_leaf(ca: KeyPair, subject: x509.Name, public_key: ec.EllipticCurvePublicKey,
               *, hosts: list[str], validity: dt.timedelta) -> bytes:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(list(dict.fromkeys(sans))), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def issue(ca: KeyPair, common_name: str, *, hosts: list[str] | None = None,
          organization: str | None = None, role: str | None = None,
          validity: dt.timedelta = VALIDITY) -> KeyPair:
    """A leaf certificate usable as both TLS server and client, with SANs for `hosts`.

    `organization` becomes the subject's O (Kubernetes reads it as the user's group);
    `role` its OU, which the director's role table reads (fedkube.transport.roles).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _sign_leaf(ca, _subject(common_name, organization=organization, role=role),
                      key.public_key(), hosts=[common_name, *(hosts or [])], validity=validity)
    return KeyPair(cert, _key_pem(key))


def make_request(common_name: str, *, role: str) -> tuple[bytes, bytes]:
    """A PKCS#10 request for CN=common_name, OU=role, and its new private key (both PEM):
    the key never leaves the requester."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(_subject(common_name, role=role))
               .sign(key, hashes.SHA256()))
    return request.public_bytes(serialization.Encoding.PEM), _key_pem(key)


@dataclass(frozen=True)
class RequestSubject:
    common_name: str
    role: str


class BadRequest(ValueError):
    """A certificate request that is unreadable, badly signed or names more than CN/OU."""


def read_request(request_pem: bytes) -> tuple[RequestSubject, x509.CertificateSigningRequest]:
    """The CN and OU of a request, after checking its signature (the requester holds the
    key) and that its subject names nothing else."""
    try:
        request = x509.load_pem_x509_csr(request_pem)
    except ValueError as exc:
        raise BadRequest(f"not a PEM certificate request: {exc}") from exc
    if not request.is_signature_valid:
        raise BadRequest("the request's signature does not match its public key")
    if not isinstance(request.public_key(), ec.EllipticCurvePublicKey):
        raise BadRequest("the request's key is not an elliptic-curve key")
    attributes = {attribute.oid: attribute.value for attribute in request.subject}
    if (len(list(request.subject)) != 2
            or set(attributes) != {NameOID.COMMON_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME}):
        raise BadRequest(f"the subject must be exactly CN=<shard>, OU=<role>, got "
                         f"{request.subject.rfc4514_string()!r}")
    return RequestSubject(common_name=str(attributes[NameOID.COMMON_NAME]),
                          role=str(attributes[NameOID.ORGANIZATIONAL_UNIT_NAME])), request


def sign_request(ca: KeyPair, request: x509.CertificateSigningRequest, *,
                 validity: dt.timedelta = VALIDITY) -> bytes:
    """The CA's certificate for a request already checked with `read_request`: its subject
    and public key, none of its requested extensions."""
    public_key = request.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)  # checked by read_request
    common_name = str(request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    return _sign_leaf(ca, request.subject, public_key, hosts=[common_name], validity=validity)


def write_pair(directory: Path, name: str, pair: KeyPair) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(pair.cert_pem)
    key.touch(mode=0o600)
    key.write_bytes(pair.key_pem)
    return cert, key


def load_or_create_ca(directory: Path) -> KeyPair:
    """Reuses DIR/ca.crt and DIR/ca.key when present, so more leaves can be added later."""
    cert, key = directory / "ca.crt", directory / "ca.key"
    if cert.exists() and key.exists():
        return KeyPair(cert.read_bytes(), key.read_bytes())
    ca = create_ca()
    write_pair(directory, "ca", ca)
    return ca

def renewal_delay(certificate: bytes, *, renew_before_s: float | None = None,
                  now: dt.datetime | None = None) -> float:
    """Seconds until a certificate (PEM) is due for renewal: renew_before_s before it
    expires, or by default once two thirds of its lifetime have passed; 0 when due."""
    cert = x509.load_pem_x509_certificate(certificate)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    before = (dt.timedelta(seconds=renew_before_s) if renew_before_s is not None
              else (end - start) / 3)
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (end - before - now).total_seconds())


def write_pair_files(cert_path: Path, key_path: Path, certificate: bytes, key_pem: bytes) -> None:
    """Writes a key (mode 0600) and its certificate, each by rename over the old file."""
    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    for path, data in ((key_path, key_pem), (cert_path, certificate)):
        staged = path.with_name(f".{path.name}.new")
        staged.unlink(missing_ok=True)
        staged.touch(mode=0o600)
        staged.write_bytes(data)
        staged.replace(path)
