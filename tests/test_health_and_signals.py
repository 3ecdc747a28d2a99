"""The director's gRPC health service (grpc.health.v1, for a kubelet's grpc probe) and how
the long-running commands end on SIGTERM (a Pod deleted)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedkube.api.config import DirectorConfig, TLSSettings
from fedkube.api.plan import Plan
from fedkube.client import DirectorClient, experiment_archive
from fedkube.dev.processes import (
    Process,
    child_pids,
    director_process,
    envoy_process,
    free_port,
    wait_for,
)
from fedkube.director.server import SERVED, DirectorServer
from fedkube.proto import director_pb2, director_pb2_grpc
from fedkube.transport.tls import TLSFiles, channel_credentials
from tests.helpers import CertDir, RunningDirector, shard_request

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# What SIGTERM may take at most: a Pod's default grace period is 30 s; the director drains
# in about 1 s (its gRPC grace) plus its frontends' own.
EXIT_WITHIN_S = 5.0


def _aio_channel(address: str, tls: TLSFiles | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, channel_credentials(tls))


async def check(address: str, *, tls: TLSFiles | None = None, service: str = "") -> Any:
    async with _aio_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return reply.status


def status_now(address: str, *, tls: TLSFiles | None = None) -> Any:
    """Blocking Check of the overall status; None while nothing answers."""
    channel = (grpc.insecure_channel(address) if tls is None
               else grpc.secure_channel(address, channel_credentials(tls)))
    with channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return None


def _server(tmp_path: Path, tls: TLSSettings) -> DirectorServer:
    return DirectorServer(DirectorConfig(host="127.0.0.1", port=0, data_dir=tmp_path / "d",
                                         health_port=0, tls=tls))


# -- in-process directors ------------------------------------------------------------------

async def test_health_on_the_directors_port(director: RunningDirector) -> None:
    """Directly and through a frontend (the fixture's routes): a frontend relays Health,
    so whichever process the kernel hands a connection answers the director's status."""
    assert await check(director.address) == SERVING
    for service in SERVED:
        assert await check(director.address, service=service) == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await check(director.address, service="no.such.Service")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    async with grpc.aio.insecure_channel(director.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
        assert (await watch.read()).status == SERVING  # a stream Health writes, relayed
        watch.cancel()


@pytest.mark.parametrize("cert", ["env1", "alice", "collab1", "root"])
async def test_health_on_the_mtls_port_is_open_to_every_role(
        mtls_director: RunningDirector, cert_dir: CertDir, cert: str) -> None:
    tls = TLSFiles.from_dir(cert_dir.path, cert)
    assert await check(mtls_director.address, tls=tls) == SERVING
    # A certificate of the CA without a fedkube role is refused, as for every RPC there.
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await check(mtls_director.address, tls=TLSFiles.from_dir(cert_dir.path, "norole"))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_plaintext_health_port_under_mtls_serves_health_alone(
        tmp_path: Path, cert_dir: CertDir) -> None:
    server = _server(tmp_path, cert_dir.settings("director"))
    await server.start()
    try:
        assert server.health_port and server.health_port != server.port
        plain = f"127.0.0.1:{server.health_port}"
        assert await check(plain) == SERVING  # no certificate, as a kubelet probes
        for service in SERVED:
            assert await check(plain, service=service) == SERVING
        async with grpc.aio.insecure_channel(plain) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await director_pb2_grpc.DirectorStub(channel).GetEnvoys(
                    director_pb2.GetEnvoysRequest(), timeout=5)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # The gRPC port itself still wants mTLS.
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await check(f"127.0.0.1:{server.port}")
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_not_serving_while_starting(tmp_path: Path) -> None:
    server = _server(tmp_path, TLSSettings(insecure=True))
    seen: list[Any] = []
    start_grpc = server.server.start

    async def observed_start() -> None:  # the last step of start(): the aggregators run
        seen.append(await check(f"127.0.0.1:{server.health_port}"))
        await start_grpc()

    server.server.start = observed_start  # type: ignore[method-assign]
    await server.start()
    try:
        assert seen == [NOT_SERVING]
        assert await check(f"127.0.0.1:{server.health_port}") == SERVING
    finally:
        await server.stop(None)


async def test_not_serving_from_the_moment_it_stops(tmp_path: Path) -> None:
    server = _server(tmp_path, TLSSettings(insecure=True))
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                          timeout=30)
        assert (await watch.read()).status == SERVING
        stopping = asyncio.create_task(server.stop(1.0))
        assert (await watch.read()).status == NOT_SERVING
        await stopping
        watch.cancel()


# -- real processes ------------------------------------------------------------------------

def _stop_timed(process: Process) -> tuple[int, float]:
    """SIGTERM, then its exit code and how long it took."""
    assert process.popen is not None
    started = time.monotonic()
    process.popen.send_signal(signal.SIGTERM)
    code = process.wait(timeout=30)
    return code, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["insecure", "mtls"])
def test_director_process_serves_health_stops_on_sigterm_and_restarts(
        tmp_path: Path, cert_dir: CertDir, processes: list[Process], mode: str) -> None:
    certs = cert_dir.path if mode == "mtls" else None

    def tls(name: str) -> TLSFiles | None:
        return None if certs is None else TLSFiles.from_dir(cert_dir.path, name)

    port, health_port = free_port(), free_port()
    extra = ["--health-port", str(health_port)]
    first = director_process(tmp_path, port, cert_dir=certs, extra=extra).start()
    processes.append(first)
    wait_for(lambda: status_now(f"127.0.0.1:{health_port}") == SERVING, timeout=60,
             message="the health port SERVING")
    assert status_now(f"localhost:{port}", tls=tls("alice")) == SERVING
    # Something for the restarted director to serve: a shard, and an experiment for it.
    envoy_tls = tls("env1")
    channel = (grpc.insecure_channel(f"localhost:{port}") if envoy_tls is None else
               grpc.secure_channel(f"localhost:{port}", channel_credentials(envoy_tls)))
    with channel:
        assert director_pb2_grpc.DirectorStub(channel).UpdateShardInfo(
            shard_request("env1"), timeout=10).accepted
    archive, initial = experiment_archive(Plan(task="digits-logreg", rounds=2))
    with DirectorClient(f"localhost:{port}", tls=tls("alice"), client_id="alice",
                        timeout=10) as client:
        client.submit("survivor", archive, collaborators=["env1"], initial_model=initial)

    code, took = _stop_timed(first)
    print(f"director ({mode}) exited {code} {took:.2f} s after SIGTERM")
    assert code == 0, first.output()[-3000:]
    assert took < EXIT_WITHIN_S

    again = director_process(tmp_path, port, cert_dir=certs, extra=extra,
                             name="director-again").start()
    processes.append(again)
    wait_for(lambda: status_now(f"127.0.0.1:{health_port}") == SERVING, timeout=60,
             message="the restarted director SERVING")
    with DirectorClient(f"localhost:{port}", tls=tls("alice"), client_id="alice",
                        timeout=10) as client:
        assert "survivor" in [name for name, _, _ in client.experiments()]


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@pytest.mark.slow
def test_director_with_frontends_exits_on_sigterm(tmp_path: Path,
                                                   processes: list[Process]) -> None:
    port, health_port = free_port(), free_port()
    director = director_process(tmp_path, port, extra=[
        "--frontends", "2", "--health-port", str(health_port)]).start()
    processes.append(director)
    wait_for(lambda: status_now(f"127.0.0.1:{health_port}") == SERVING, timeout=60,
             message="the health port SERVING")
    # Fresh connections to the shared port land on the director and on its frontends
    # alike; each of them answers SERVING.
    for _ in range(8):
        assert status_now(f"127.0.0.1:{port}") == SERVING
    assert director.popen is not None
    frontends = child_pids(director.popen.pid)
    assert len(frontends) == 2
    code, took = _stop_timed(director)
    print(f"director with 2 frontends exited {code} {took:.2f} s after SIGTERM")
    assert code == 0, director.output()[-3000:]
    assert took < EXIT_WITHIN_S
    wait_for(lambda: not any(_alive(pid) for pid in frontends), timeout=10,
             message="the frontends gone with their director")


@pytest.mark.slow
def test_envoy_exits_promptly_on_sigterm(tmp_path: Path, processes: list[Process]) -> None:
    port = free_port()
    processes.append(director_process(tmp_path, port, period=1.0).start())
    envoy = envoy_process(tmp_path, "env0", port, index=0, count=1).start()
    processes.append(envoy)
    with DirectorClient(f"localhost:{port}", client_id="alice", timeout=10) as client:
        client.wait_online(1, timeout=60)
    code, took = _stop_timed(envoy)
    print(f"envoy exited {code} {took:.2f} s after SIGTERM")
    assert code == 0, envoy.output()[-3000:]
    assert took < EXIT_WITHIN_S


def _probe(work_dir: Path, *ready: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedkube.cli", "envoy", "probe",
                           "--work-dir", str(work_dir), *ready], capture_output=True,
                          text=True, timeout=60)


def test_envoy_probes_say_live_and_ready_as_its_director_comes_and_goes(
        tmp_path: Path, processes: list[Process]) -> None:
    """An envoy serves no port: its probes read the health file its loop writes. Ready
    while its shard is registered and the director answers; live all along."""
    port = free_port()
    envoy = envoy_process(tmp_path, "env0", port, index=0, count=1).start()
    processes.append(envoy)
    work_dir = tmp_path / "env0"
    wait_for(lambda: _probe(work_dir).returncode == 0, timeout=60, interval=0.5,
             message="the envoy live, with no director yet")
    not_ready = _probe(work_dir, "--ready")
    assert not_ready.returncode == 1
    assert "not registered" in not_ready.stdout
    director = director_process(tmp_path, port, period=1.0).start()
    processes.append(director)
    wait_for(lambda: _probe(work_dir, "--ready").returncode == 0, timeout=60, interval=0.5,
             message="the envoy ready once registered")
    director.stop()
    wait_for(lambda: _probe(work_dir, "--ready").returncode == 1, timeout=60, interval=0.5,
             message="the envoy not ready without its director")
    assert "has not answered a health check" in _probe(work_dir, "--ready").stdout
    assert _probe(work_dir).returncode == 0  # still live: it reconnects by itself


# A collaborator's rounds are blocking calls: SIGTERM must end one mid-call (here a call
# waiting for a director that is not there), its `finally` blocks run.
_BLOCKED_COLLABORATOR = """
import sys, grpc
from fedkube.collaborator.main import exit_on_sigterm
exit_on_sigterm()
channel = grpc.insecure_channel("127.0.0.1:{port}")
call = channel.unary_unary("/openfl.aggregator.Aggregator/GetTasks")
try:  # "ready" inside: a SIGTERM that comes before the call starts also runs the finally
    print("ready", flush=True)
    call(b"", timeout=60, wait_for_ready=True)
finally:
    print("cleaned up", flush=True)
"""


@pytest.mark.slow
def test_collaborator_exits_on_sigterm_mid_call() -> None:
    with subprocess.Popen([sys.executable, "-c",
                           _BLOCKED_COLLABORATOR.format(port=free_port())],
                          stdout=subprocess.PIPE, text=True) as process:
        _stop_collaborator(process)


def _stop_collaborator(process: subprocess.Popen[str]) -> None:
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"  # blocks until it says so
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
        took = time.monotonic() - started
        print(f"collaborator exited {code} {took:.2f} s after SIGTERM")
        assert code == 128 + signal.SIGTERM
        assert took < EXIT_WITHIN_S
        assert "cleaned up" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
