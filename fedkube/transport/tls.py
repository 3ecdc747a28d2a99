"""gRPC credentials for mutual TLS, built from PEM files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from fedkube.api.config import TLSSettings


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

    @classmethod
    def from_dir(cls, directory: Path, name: str) -> TLSFiles:
        """ca.crt plus NAME.crt/NAME.key, as `fedkube certs` writes them."""
        return cls(ca=(directory / "ca.crt").read_bytes(),
                   cert=(directory / f"{name}.crt").read_bytes(),
                   key=(directory / f"{name}.key").read_bytes())


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    """Server side of mTLS: clients must present a certificate signed by our CA."""
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True
    )


def channel_credentials(tls: TLSFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )
