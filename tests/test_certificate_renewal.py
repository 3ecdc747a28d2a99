"""An envoy that requests its own certificate renews it before it expires and reconnects
with the new one; collaborators pick up renewed certificates between rounds. A real mTLS
director on loopback, and certificates that last seconds (issued from the test CA, as the
operator would sign them)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509

from fedkube.api.config import DirectorConfig, EnvoyConfig, TLSSettings
from fedkube.api.plan import Plan
from fedkube.collaborator.run import Collaborator
from fedkube.dev.processes import free_port
from fedkube.director.server import DirectorServer
from fedkube.envoy_agent.agent import EnvoyAgent
from fedkube.kube.csr import CertificateRefused
from fedkube.tasks.digits import DigitsShard
from fedkube.tasks.models import BUILTIN_TASKS
from fedkube.tasks.shard import load_shard
from fedkube.transport import certs
from fedkube.transport.bulk import BulkError
from fedkube.transport.certs import renewal_delay
from fedkube.transport.certs import write_pair_files as write_pair
from fedkube.transport.tls import TLSFiles
from tests.helpers import CertDir, RunningDirector, eventually, running_experiment

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


def _certificate(ca: certs.KeyPair, lifetime: dt.timedelta) -> bytes:
    return certs.issue(ca, "env1", role="envoy", validity=lifetime).cert_pem


def test_renewal_is_due_a_third_of_the_lifetime_before_expiry_or_as_configured(
        cert_dir: CertDir) -> None:
    ca = certs.load_or_create_ca(cert_dir.path)
    pem = _certificate(ca, dt.timedelta(days=30))
    cert = x509.load_pem_x509_certificate(pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    lifetime = (end - start).total_seconds()
    assert renewal_delay(pem, now=start) == pytest.approx(2 * lifetime / 3)
    assert renewal_delay(pem, renew_before_s=3600, now=start) == pytest.approx(lifetime - 3600)
    assert renewal_delay(pem, now=end) == 0.0  # overdue: at once
    assert renewal_delay(pem, renew_before_s=2 * lifetime, now=start) == 0.0


def test_settings_refuse_renewal_options_without_requesting_certificates(
        cert_dir: CertDir) -> None:
    tls = cert_dir.settings("env1")
    with pytest.raises(ValueError, match="go with request_certificate"):
        TLSSettings(ca=tls.ca, cert=tls.cert, key=tls.key, renew_before_s=60)
    with pytest.raises(ValueError, match="greater than or equal to 600"):
        TLSSettings(ca=tls.ca, cert=tls.cert, key=tls.key, request_certificate=True,
                    certificate_lifetime_s=60)


@pytest.mark.slow  # waits for certificates to expire
async def test_envoy_renews_its_certificate_and_reconnects_with_the_new_one(
        tmp_path: Path, cert_dir: CertDir) -> None:
    ca = certs.load_or_create_ca(cert_dir.path)
    cert_path, key_path = tmp_path / "env1" / "tls.crt", tmp_path / "env1" / "tls.key"
    renewals: list[float] = []

    def renew() -> None:  # what a signed CertificateSigningRequest gives the envoy
        pair = certs.issue(ca, "env1", role="envoy", validity=dt.timedelta(seconds=6))
        write_pair(cert_path, key_path, pair.cert_pem, pair.key_pem)
        renewals.append(time.time())

    renew()
    first_expiry = x509.load_pem_x509_certificate(cert_path.read_bytes()).not_valid_after_utc
    port = free_port()

    def director() -> DirectorServer:
        return DirectorServer(DirectorConfig(
            host="127.0.0.1", port=port, data_dir=tmp_path / "director",
            health_check_period=0.5, tls=cert_dir.settings("director")))

    server = director()
    await server.start()
    config = EnvoyConfig(
        name="env1", director=f"localhost:{port}", runtime="process",
        work_dir=tmp_path / "work",
        tls=TLSSettings(ca=cert_dir.path / "ca.crt", cert=cert_path, key=key_path,
                        request_certificate=True, renew_before_s=4.0))
    agent = EnvoyAgent(config, load_shard("digits", {"index": "0", "count": "2"}),
                       renew_certificate=renew)
    running = asyncio.create_task(agent.run())
    try:
        await eventually(agent.registered.is_set, within=30, message="env1 registered")
        # Renewed twice, and the certificate it first connected with has expired.
        await eventually(lambda: len(renewals) >= 3
                         and dt.datetime.now(dt.UTC) > first_expiry + dt.timedelta(seconds=1),
                         within=30, message="two renewals and the first certificate expired")
        # A restarted director makes the envoy connect again: a TLS handshake, which the
        # expired first certificate would fail.
        await server.stop(None)
        restarted_at = time.time()
        server = director()
        await server.start()

        def checked_in_since_restart() -> bool:
            return any(e.name == "env1" and e.last_updated > restarted_at
                       for e in server.director.get_envoys())

        await eventually(checked_in_since_restart, within=20,
                         message="env1's health check at the restarted director")
        assert not running.done()
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await server.stop(None)


def _collaborator(director: RunningDirector, files: TLSSettings, **extra: Any) -> Collaborator:
    return Collaborator(target=director.address, experiment="exp", name="env1",
                        plan=Plan(task="digits-logreg", rounds=2),
                        task=BUILTIN_TASKS["digits-logreg"], shard=DigitsShard(0, 2),
                        tls=TLSFiles.load(files), **extra)


async def test_a_collaborator_picks_up_its_renewed_certificate_between_rounds(
        mtls_director: RunningDirector, cert_dir: CertDir, tmp_path: Path) -> None:
    """A local collaborator reads the certificate files it shares with its envoy again
    between rounds: once the envoy has renewed them and the first certificate expired,
    it still reaches the director, where one that kept the old certificate is refused."""
    aggregator = await running_experiment(mtls_director, cert_dir)
    ca = certs.load_or_create_ca(cert_dir.path)
    cert_path, key_path = tmp_path / "env1" / "tls.crt", tmp_path / "env1" / "tls.key"
    first = certs.issue(ca, "env1", role="envoy", validity=dt.timedelta(seconds=3))
    write_pair(cert_path, key_path, first.cert_pem, first.key_pem)
    files = TLSSettings(ca=cert_dir.path / "ca.crt", cert=cert_path, key=key_path)
    # Reads the files at every check (a collaborator waits CERTIFICATE_CHECK_S between them).
    renewing = _collaborator(mtls_director, files, certificate_files=files,
                             certificate_check_s=0.0)
    stale = _collaborator(mtls_director, files)  # never reads the files again
    try:
        for collaborator in (renewing, stale):  # a bulk session each, with the first
            await asyncio.to_thread(collaborator.fetch_model, 0)
        assert not renewing.refresh_certificate()  # the files have not changed
        renewed = certs.issue(ca, "env1", role="envoy")  # the envoy renews them
        write_pair(cert_path, key_path, renewed.cert_pem, renewed.key_pem)
        expiry = x509.load_pem_x509_certificate(first.cert_pem).not_valid_after_utc
        await eventually(lambda: dt.datetime.now(dt.UTC) > expiry, within=10,
                         message="the first certificate to expire")
        assert renewing.refresh_certificate()
        assert renewing.tls is not None and renewing.tls.cert == renewed.cert_pem
        model = await asyncio.to_thread(renewing.fetch_model, 0)
        np.testing.assert_array_equal(model["weights"], aggregator.model["weights"])
        with pytest.raises(BulkError) as error:
            await asyncio.to_thread(stale.fetch_model, 0)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        renewing.close()
        stale.close()


async def test_a_collaborator_pod_requests_its_next_certificate_when_due(
        mtls_director: RunningDirector, cert_dir: CertDir, tmp_path: Path) -> None:
    """One that requested its own certificate requests the next once a third of its
    lifetime is left, and keeps the current one when the request fails or its files are
    caught half renewed."""
    await running_experiment(mtls_director, cert_dir)
    ca = certs.load_or_create_ca(cert_dir.path)
    cert_path, key_path = tmp_path / "collab" / "tls.crt", tmp_path / "collab" / "tls.key"
    due = certs.issue(ca, "env1", role="collaborator", validity=dt.timedelta(seconds=30))
    write_pair(cert_path, key_path, due.cert_pem, due.key_pem)  # 5 min 30 s, 30 s left
    files = TLSSettings(ca=cert_dir.path / "ca.crt", cert=cert_path, key=key_path)
    requests: list[bytes] = []

    def refused() -> None:
        raise CertificateRefused("certificate request denied: not on the shard's node")

    def signed() -> None:  # what the operator's signature gives the Pod
        pair = certs.issue(ca, "env1", role="collaborator")
        write_pair(cert_path, key_path, pair.cert_pem, pair.key_pem)
        requests.append(pair.cert_pem)

    collaborator = _collaborator(mtls_director, files, certificate_files=files,
                                 renew_certificate=refused, certificate_check_s=0.0)
    try:
        assert not collaborator.refresh_certificate()
        assert collaborator.tls is not None and collaborator.tls.cert == due.cert_pem
        # Read between a renewal's two renames (the new key, the old certificate): kept.
        key_path.write_bytes(certs.issue(ca, "env1", role="collaborator").key_pem)
        assert not collaborator.refresh_certificate()
        assert collaborator.tls.key == due.key_pem
        collaborator.renew_certificate = signed
        assert collaborator.refresh_certificate()
        assert collaborator.tls is not None and collaborator.tls.cert == requests[0]
        await asyncio.to_thread(collaborator.fetch_model, 0)
    finally:
        collaborator.close()
