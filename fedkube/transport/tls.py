"""gRPC credentials for mutual TLS, built from PEM files."""

from __future__ import annotations

import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedkube.api.config import TLSSettings
from fedkube.transport import peer


@dataclass(frozen=True)
class TLSFiles:
    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, settings: TLSSettings) -> TLSFiles | None:
        """None in insecure mode; the three PEM files otherwise."""
        if settings.insecure:
            return None
        assert settings.ca and settings.cert and settings.key  # checked by TLSSettings
        return cls(ca=settings.ca.read_bytes(), cert=settings.cert.read_bytes(),
                   key=settings.key.read_bytes())

    def key_matches_certificate(self) -> bool:
        """False for a key and certificate read while a renewal was between its two
        renames (fedkube.kube.csr.write_pair)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            key = serialization.load_pem_private_key(self.key, password=None)
            cert = x509.load_pem_x509_certificate(self.cert)
        except ValueError:
            return False
        return bool(key.public_key() == cert.public_key())

    @classmethod
    def from_dir(cls, directory: Path, name: str) -> TLSFiles:
        """ca.crt plus NAME.crt/NAME.key, as `fedkube certs` writes them."""
        return cls(ca=(directory / "ca.crt").read_bytes(),
                   cert=(directory / f"{name}.crt").read_bytes(),
                   key=(directory / f"{name}.key").read_bytes())


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    """Server side of mTLS: clients must present a certificate signed by our CA. (Its
    handshake does not hold their chains to the CA's path length: the guard does, through
    fedkube.transport.peer, which learns the CA here.)"""
    peer.trust(tls.ca)
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True
    )


def channel_credentials(tls: TLSFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )


def ssl_context(tls: TLSFiles, *, server: bool) -> ssl.SSLContext:
    """The same mutual TLS for a plain socket (fedkube.transport.bulk): our CA only, a
    client certificate required, the server's name checked by the client."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=tls.ca.decode())
    if server:
        context.verify_mode = ssl.CERT_REQUIRED
        peer.trust(tls.ca)  # for the role checks, as on the gRPC port
    # The ssl module loads a key pair from files only: a private directory, gone at once.
    with tempfile.TemporaryDirectory(prefix="fedkube-tls-") as directory:
        cert, key = Path(directory) / "tls.crt", Path(directory) / "tls.key"
        cert.write_bytes(tls.cert)
        key.touch(mode=0o600)
        key.write_bytes(tls.key)
        context.load_cert_chain(cert, key)
    return context
