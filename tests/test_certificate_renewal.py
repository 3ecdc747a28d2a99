"""An envoy that requests its own certificate renews it before it expires and reconnects
with the new one: a real mTLS director on loopback, and an envoy agent whose certificates
last seconds (issued from the test CA, as the operator would sign them)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from fedkube.api.config import DirectorConfig, EnvoyConfig, TLSSettings
from fedkube.director.server import DirectorServer
from fedkube.envoy_agent.agent import EnvoyAgent
from fedkube.local import free_port
from fedkube.tasks.shard import load_shard
from fedkube.transport import certs
from fedkube.transport.shard_certificate import renewal_delay, write_pair
from tests.conftest import CertDir

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


async def _until(predicate: Callable[[], bool], within_s: float, what: str) -> None:
    try:
        async with asyncio.timeout(within_s):
            # No event signals these (a file's expiry, another server's registry): poll.
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise TimeoutError(f"timed out after {within_s}s waiting for {what}") from None


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
        await _until(agent.registered.is_set, 30, "env1 registered")
        # Renewed twice, and the certificate it first connected with has expired.
        await _until(lambda: len(renewals) >= 3
                     and dt.datetime.now(dt.UTC) > first_expiry + dt.timedelta(seconds=1),
                     30, "two renewals and the first certificate expired")
        # A restarted director makes the envoy connect again: a TLS handshake, which the
        # expired first certificate would fail.
        await server.stop(None)
        restarted_at = time.time()
        server = director()
        await server.start()

        def checked_in_since_restart() -> bool:
            return any(e.name == "env1" and e.last_updated > restarted_at
                       for e in server.director.get_envoys())

        await _until(checked_in_since_restart, 20, "env1's health check at the restarted "
                     "director")
        assert not running.done()
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await server.stop(None)
