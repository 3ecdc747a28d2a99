"""One verification of a client's certificate chain wherever a role is granted: the gRPC
port, the bulk port, and the frontends' private hop (fedkube.transport.peer).

BoringSSL (the gRPC port) ignores a CA's path length where OpenSSL (the bulk port)
enforces it; the private hop has no TLS at all. Real servers on loopback, certificates
made here with `cryptography`."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedkube.api.config import TLSSettings
from fedkube.proto import director_pb2, director_pb2_grpc, frontend_pb2, frontend_pb2_grpc
from fedkube.transport import certs
from fedkube.transport.bulk import BulkClient, BulkError, BulkServer, PeerContext, Segments
from fedkube.transport.channel import open_channel
from fedkube.transport.forwarding import (
    CERT_HEADER,
    CHAIN_HEADER,
    CN_HEADER,
    SECRET_HEADER,
    Metadata,
)
from fedkube.transport.roles import verified_role
from fedkube.transport.tls import TLSFiles
from tests.helpers import RunningDirector, running_director, start_director

ROUTES = ["direct", pytest.param("frontend", marks=pytest.mark.slow)]
PATH_LENGTH = "path length constraint"


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca(name: str, *, path_length: int | None, parent: certs.KeyPair | None = None
        ) -> certs.KeyPair:
    """A CA certificate: a root, or an intermediate issued by `parent`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer, signer = subject, key
    if parent is not None:
        issuer = x509.load_pem_x509_certificate(parent.cert_pem).subject
        parent_key = serialization.load_pem_private_key(parent.key_pem, password=None)
        assert isinstance(parent_key, ec.EllipticCurvePrivateKey)
        signer = parent_key
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length),
                           critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(signer, hashes.SHA256()))
    return certs.KeyPair(_pem(cert), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


@dataclass(frozen=True)
class Pki:
    """A root, the director's certificate from it, and client certificates: `direct`
    from the root, `chained` through an intermediate (its file holds both)."""

    root: certs.KeyPair
    directory: Path
    intermediate: certs.KeyPair

    def client(self, name: str) -> TLSFiles:
        return TLSFiles.from_dir(self.directory, name)

    def settings(self) -> TLSSettings:
        return TLSSettings(ca=self.directory / "ca.crt", cert=self.directory / "director.crt",
                           key=self.directory / "director.key")


def _pki(directory: Path, *, root_path_length: int | None) -> Pki:
    root = _ca("chains-root", path_length=root_path_length)
    intermediate = _ca("chains-intermediate", path_length=0, parent=root)
    certs.write_pair(directory, "ca", root)
    certs.write_pair(directory, "director", certs.issue(root, "localhost", hosts=["127.0.0.1"],
                                                        role="director"))
    certs.write_pair(directory, "direct", certs.issue(root, "alice", role="owner"))
    chained = certs.issue(intermediate, "bob", role="owner")
    certs.write_pair(directory, "chained",
                     certs.KeyPair(chained.cert_pem + intermediate.cert_pem, chained.key_pem))
    return Pki(root, directory, intermediate)


@pytest.fixture
def strict_pki(tmp_path: Path) -> Pki:
    """Below a root with pathlen:0 (as `fedkube certs` makes its CA): no intermediate."""
    return _pki(tmp_path / "strict", root_path_length=0)


@pytest.fixture
def open_pki(tmp_path: Path) -> Pki:
    """Below a root with no path length limit: one intermediate is legitimate."""
    return _pki(tmp_path / "open", root_path_length=None)


async def _list_experiments(address: str, tls: TLSFiles) -> grpc.aio.AioRpcError | None:
    """An owner's RPC; the error it ended with, or None."""
    channel = open_channel(address, tls=tls, client_id="test")
    try:
        await director_pb2_grpc.DirectorStub(channel).GetExperimentsList(
            director_pb2.GetExperimentsListRequest(), timeout=10)
    except grpc.aio.AioRpcError as error:
        return error
    finally:
        await channel.close(None)
    return None


@pytest.mark.parametrize("route", ROUTES)
async def test_a_leaf_through_an_intermediate_below_a_pathlen_0_ca_is_refused_on_grpc(
        tmp_path: Path, strict_pki: Pki, route: str) -> None:
    """BoringSSL lets the chain through the handshake (and the old role check granted its
    OU); the guard refuses it, directly and relayed by a frontend, and names why."""
    async with running_director(tmp_path, tls=strict_pki.settings(), route=route) as running:
        assert await _list_experiments(running.address, strict_pki.client("direct")) is None
        error = await _list_experiments(running.address, strict_pki.client("chained"))
        assert error is not None
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        details = error.details() or ""
        assert "CN=bob" in details and PATH_LENGTH in details, details


class RoleEcho:
    """A bulk handler that answers a download with the caller's verified role."""

    def download(self, context: PeerContext, header: bytes) -> Segments:
        role, problem = verified_role(context.auth_context())
        if role is None:
            raise BulkError(grpc.StatusCode.PERMISSION_DENIED, problem or "no role")
        return [role.value.encode()]

    def upload_limit(self, context: PeerContext, header: bytes) -> int:
        raise BulkError(grpc.StatusCode.UNIMPLEMENTED, "downloads only")

    def upload(self, context: PeerContext, header: bytes, body: memoryview) -> bytes:
        raise BulkError(grpc.StatusCode.UNIMPLEMENTED, "downloads only")


@pytest.fixture
async def bulk_servers() -> AsyncIterator[list[BulkServer]]:
    servers: list[BulkServer] = []
    yield servers
    for server in servers:
        await asyncio.to_thread(server.stop)


def _bulk_server(pki: Pki, servers: list[BulkServer]) -> BulkServer:
    server = BulkServer("127.0.0.1", 0, tls=TLSFiles.load(pki.settings()), handler=RoleEcho())
    server.start()
    servers.append(server)
    return server


async def _bulk_role(server: BulkServer, tls: TLSFiles, *, times: int = 1) -> list[bytes]:
    client = BulkClient("127.0.0.1", server.port, tls=tls)
    roles = [bytes(await asyncio.to_thread(client.download, "role", b""))
             for _ in range(times)]
    assert client.resumed == times - 1  # all but the first resumed a TLS session
    return roles


async def test_a_leaf_through_an_intermediate_below_a_pathlen_0_ca_is_refused_on_bulk(
        strict_pki: Pki, bulk_servers: list[BulkServer],
        caplog: pytest.LogCaptureFixture) -> None:
    """OpenSSL refuses it at the handshake, and says why in the director's log; had a
    handshake let it through, the port's own check (the gRPC port's) would refuse it."""
    server = _bulk_server(strict_pki, bulk_servers)
    assert await _bulk_role(server, strict_pki.client("direct"), times=2) == [b"owner"] * 2
    with caplog.at_level(logging.WARNING, logger="fedkube.transport.bulk"), \
            pytest.raises(ssl.SSLError):
        await _bulk_role(server, strict_pki.client("chained"))
    assert any(PATH_LENGTH in record.getMessage() for record in caplog.records), \
        caplog.text
    # The chain as the connection would hand it over (DER, the leaf first).
    leaf, intermediate = x509.load_pem_x509_certificates(strict_pki.client("chained").cert)
    der = [cert.public_bytes(serialization.Encoding.DER) for cert in (leaf, intermediate)]
    with pytest.raises(BulkError) as refused:
        PeerContext(der[0], der, ca=strict_pki.root.cert_pem)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "CN=bob" in refused.value.details() and PATH_LENGTH in refused.value.details()


@pytest.mark.parametrize("route", ROUTES)
async def test_a_leaf_through_a_legitimate_intermediate_is_accepted_on_every_port(
        tmp_path: Path, open_pki: Pki, bulk_servers: list[BulkServer], route: str) -> None:
    """The same check is no stricter than the CA: below a root that allows one, a leaf
    through an intermediate it presents keeps its role, on the gRPC port (whose auth
    context has the intermediates) and on the bulk port, a resumed session too (which
    has its leaf only)."""
    async with running_director(tmp_path, tls=open_pki.settings(), route=route) as running:
        for name in ("direct", "chained"):
            assert await _list_experiments(running.address, open_pki.client(name)) is None
    server = _bulk_server(open_pki, bulk_servers)
    for name in ("direct", "chained"):
        assert await _bulk_role(server, open_pki.client(name), times=2) == [b"owner"] * 2
    # Without its intermediate, a leaf never verified before is refused.
    leaf = x509.load_pem_x509_certificate(
        certs.issue(open_pki.intermediate, "carol", role="owner").cert_pem)
    with pytest.raises(BulkError) as refused:
        PeerContext(leaf.public_bytes(serialization.Encoding.DER), ca=open_pki.root.cert_pem)
    assert "not issued by the CA" in refused.value.details()


@pytest.fixture
async def director_with_a_frontend(tmp_path: Path, strict_pki: Pki
                                   ) -> AsyncIterator[RunningDirector]:
    running = await start_director(tmp_path, tls=strict_pki.settings(), frontends=1)
    try:
        yield running
    finally:
        await running.server.stop(None)


def _self_signed_admin() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "root")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return _pem(cert)


@pytest.mark.slow
async def test_a_forged_forwarded_certificate_gets_no_role_on_the_private_hop(
        director_with_a_frontend: RunningDirector, strict_pki: Pki) -> None:
    """A process that reaches the frontends' socket (this user's, say) and forwards an
    admin certificate gets nothing: without the secret the director handed its
    frontends, nothing at all; with it, only a certificate whose chain verifies."""
    frontends = director_with_a_frontend.server.frontends
    assert frontends is not None
    genuine = certs.issue(strict_pki.root, "root", role="admin").cert_pem
    other_ca = certs.issue(certs.create_ca("another-ca"), "root", role="admin").cert_pem
    secret: Metadata = ((SECRET_HEADER, frontends.secret),)
    leaf, intermediate = (_pem(cert) for cert in x509.load_pem_x509_certificates(
        strict_pki.client("chained").cert))
    channel = grpc.aio.insecure_channel(f"unix:{frontends.socket}")
    director = director_pb2_grpc.DirectorStub(channel)

    async def as_forwarded(cert: bytes, extra: Metadata = ()) -> grpc.aio.AioRpcError | None:
        metadata: Metadata = ((CERT_HEADER, cert), (CN_HEADER, "root"), *extra)
        try:
            await director.GetExperimentsList(director_pb2.GetExperimentsListRequest(),
                                              metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error
        return None

    try:
        for cert, extra, text in (
                (genuine, (), "no valid frontend secret"),  # certificates are public
                (_self_signed_admin(), secret, "not issued by the CA"),
                (other_ca, secret, "not issued by the CA"),
                (leaf, (*secret, (CHAIN_HEADER, intermediate)), PATH_LENGTH)):
            error = await as_forwarded(cert, extra)
            assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED, \
                (text, error)
            assert text in (error.details() or ""), error.details()
        assert await as_forwarded(genuine, secret) is None  # what a frontend does
        # Nor do the frontends' own calls register shards or record checks without it.
        reports = frontend_pb2_grpc.FrontendStub(channel)
        for call in (reports.RegisterShards(frontend_pb2.ShardRegistrations(), timeout=10),
                     reports.ReportHealth(frontend_pb2.HealthReport(), timeout=10)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not director_with_a_frontend.server.director.get_envoys()
    finally:
        await channel.close(None)
