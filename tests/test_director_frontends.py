"""A director's frontend processes: they share its port, answer health checks, relay every
other call, and never outlive it. (Every test of the `director` and `mtls_director`
fixtures also runs through a frontend: tests/conftest.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedkube.api.config import TLSSettings
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
from fedkube.director import metrics
from fedkube.proto import director_pb2, director_pb2_grpc
from fedkube.transport.forwarding import CERT_HEADER, CN_HEADER
from fedkube.transport.tls import TLSFiles
from tests.helpers import (
    CertDir,
    RunningDirector,
    eventually,
    running_director,
    scrape,
    shard_request,
    start_director,
    stub,
)

# Every test starts frontend processes, most a director's or envoys' too.
pytestmark = pytest.mark.slow
GPU = director_pb2.CudaDeviceInfo(index=0, name="NVIDIA H200", memory_total=150 << 30)


def frontend_checks() -> float:
    return float(metrics.FRONTEND_HEALTH_CHECKS._value.get())


async def test_a_frontend_answers_health_checks_and_the_director_records_them(
        tmp_path: Path) -> None:
    async with running_director(tmp_path, tls=TLSSettings(insecure=True),
                                route="frontend") as running:
        envoy = stub(running.address, client_id="env1")
        assert (await envoy.UpdateShardInfo(shard_request("env1"))).accepted
        before = frontend_checks()
        check = director_pb2.UpdateEnvoyStatusRequest(name="env1", is_experiment_running=True,
                                                      cuda_devices=[GPU])
        for _ in range(5):
            reply = await envoy.UpdateEnvoyStatus(check)
            assert reply.health_check_period.ToNanoseconds() == 2_000_000_000
        # The first check, a new status, went to the director at once; the frontend
        # answered the four that repeated it, and reports them.
        await eventually(lambda: frontend_checks() - before == 4, within=10,
                         message="the frontend's report of 4 checks")
        state = next(s for s in running.server.director.get_envoys()
                     if s.shard_info.node_info.name == "env1")
        assert state.is_experiment_running
        assert list(state.shard_info.node_info.cuda_devices) == [GPU]
        assert running.server.director.is_online(state)
        await envoy.channel.close()  # type: ignore[attr-defined]


async def test_a_frontend_hands_registrations_over_in_batches_and_changes_at_once(
        tmp_path: Path) -> None:
    async with running_director(tmp_path, tls=TLSSettings(insecure=True),
                                route="frontend") as running:
        envoy = stub(running.address, client_id="loader")
        registrations = metrics.FRONTEND_REGISTRATIONS._value.get()
        batches = metrics.FRONTEND_REGISTRATION_BATCHES._value.get()
        replies = await asyncio.gather(*(envoy.UpdateShardInfo(shard_request(f"env{i}"))
                                         for i in range(300)))
        assert all(reply.accepted for reply in replies)
        assert len(running.server.director.get_envoys()) == 300
        assert metrics.FRONTEND_REGISTRATIONS._value.get() - registrations == 300
        # Several to a call (those that arrive while a batch is on its way go in the
        # next): the director did the work of 300 registrations in far fewer calls.
        assert metrics.FRONTEND_REGISTRATION_BATCHES._value.get() - batches <= 150
        # A check that changes the status reaches the registry before its reply does.
        for running_now in (False, True):
            await envoy.UpdateEnvoyStatus(director_pb2.UpdateEnvoyStatusRequest(
                name="env7", is_experiment_running=running_now, cuda_devices=[GPU]))
            state = next(s for s in running.server.director.get_envoys()
                         if s.shard_info.node_info.name == "env7")
            assert state.is_experiment_running is running_now
            assert list(state.shard_info.node_info.cuda_devices) == [GPU]
        await envoy.channel.close()  # type: ignore[attr-defined]


async def test_forwarded_identity_headers_from_a_caller_are_ignored(
        mtls_director: RunningDirector, cert_dir: CertDir) -> None:
    env1 = stub(mtls_director.address, tls=TLSFiles.from_dir(cert_dir.path, "env1"))
    spoofed = ((CN_HEADER, "env2"), (CERT_HEADER, (cert_dir.path / "env2.crt").read_bytes()))
    for call in (env1.UpdateShardInfo(shard_request("env2"), metadata=spoofed),
                 env1.UpdateEnvoyStatus(director_pb2.UpdateEnvoyStatusRequest(name="env2"),
                                        metadata=spoofed)):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'env1' may not act for 'env2'" in (error.value.details() or "")
    await env1.channel.close()  # type: ignore[attr-defined]


async def test_frontends_share_the_port_and_stop_with_the_director(tmp_path: Path) -> None:
    running = await start_director(tmp_path, tls=TLSSettings(insecure=True), frontends=2)
    assert running.server.frontends is not None
    frontends = list(running.server.frontends.processes)
    socket_dir = Path(running.server.frontends.socket).parent
    assert len(frontends) == 2 and socket_dir.stat().st_mode & 0o077 == 0
    before = frontend_checks()
    # A connection per envoy, as real envoys have; the kernel spreads them over the three
    # processes on the port.
    channels = [grpc.aio.insecure_channel(running.address,
                                          options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(24)]
    for i, channel in enumerate(channels):
        envoy = director_pb2_grpc.DirectorStub(channel)
        assert (await envoy.UpdateShardInfo(shard_request(f"env{i}"))).accepted
        for _ in range(3):
            await envoy.UpdateEnvoyStatus(director_pb2.UpdateEnvoyStatusRequest(
                name=f"env{i}", is_experiment_running=True))
    await eventually(lambda: all(s.is_experiment_running
                                 for s in running.server.director.get_envoys()),
                     within=10, message="every envoy's checks recorded")
    assert len(running.server.director.get_envoys()) == 24
    await eventually(lambda: frontend_checks() > before, within=10,
                     message="frontend reports")
    for channel in channels:
        await channel.close(None)
    await running.server.stop(None)
    assert all(process.returncode is not None for process in frontends)
    assert not socket_dir.exists()


async def test_a_frontend_that_dies_is_started_again(tmp_path: Path) -> None:
    running = await start_director(tmp_path, tls=TLSSettings(insecure=True), frontends=1)
    frontends = running.server.frontends
    assert frontends is not None
    first = frontends.processes[0]
    restarts = metrics.FRONTEND_RESTARTS._value.get()
    first.kill()
    await eventually(lambda: frontends.processes[0] is not first, within=60,
                     message="another frontend")
    assert frontends.processes[0].returncode is None
    assert metrics.FRONTEND_RESTARTS._value.get() == restarts + 1
    # The new one serves the port: of a dozen fresh connections, some reach it.
    before = frontend_checks()
    for i in range(12):
        channel = grpc.aio.insecure_channel(running.address,
                                            options=[("grpc.use_local_subchannel_pool", 1)])
        envoy = director_pb2_grpc.DirectorStub(channel)
        assert (await envoy.UpdateShardInfo(shard_request(f"env{i}"))).accepted
        for _ in range(2):
            await envoy.UpdateEnvoyStatus(director_pb2.UpdateEnvoyStatusRequest(name=f"env{i}"))
        await channel.close(None)
    await eventually(lambda: frontend_checks() > before, within=10,
                     message="checks answered by the new frontend")
    await running.server.stop(None)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_frontends_serve_from_the_first_connection_and_die_with_their_director(
        tmp_path: Path, processes: list[Process]) -> None:
    """Envoys connect as soon as the port answers, and keep their connection: the
    frontends must be on the port by then. And they must not outlive their director, or
    they would keep the port and a new director would share it with them."""
    port, metrics_port = free_port(), free_port()
    director = director_process(tmp_path, port, extra=[
        "--frontends", "2", "--metrics-port", str(metrics_port)]).start()
    processes.append(director)
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}",
                                      options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(24)]
    envoys = [director_pb2_grpc.DirectorStub(c) for c in channels]

    def answers() -> bool:
        """A fresh connection each time, whose first success is the earliest there is."""
        with grpc.insecure_channel(f"127.0.0.1:{port}") as probe:
            stub = director_pb2_grpc.DirectorStub(probe)
            try:
                return bool(stub.UpdateShardInfo(shard_request("env0"), timeout=5).accepted)
            except grpc.RpcError:
                return False

    wait_for(answers, timeout=60, message="the director's port")
    for i, envoy in enumerate(envoys):
        assert envoy.UpdateShardInfo(shard_request(f"env{i}"), timeout=5).accepted
        for _ in range(3):
            envoy.UpdateEnvoyStatus(director_pb2.UpdateEnvoyStatusRequest(name=f"env{i}"),
                                    timeout=5)

    def answered_by_frontends() -> float:
        try:
            return scrape(metrics_port).get(("fedkube_frontend_health_checks_total", ()), 0.0)
        except OSError:  # /metrics comes up just after the port
            return 0.0

    wait_for(lambda: answered_by_frontends() > 0, timeout=10,
             message="health checks answered by the frontends")
    for channel in channels:
        channel.close()
    assert director.popen is not None
    frontends = child_pids(director.popen.pid)
    assert len(frontends) == 2
    director.kill()
    wait_for(lambda: not any(_alive(child) for child in frontends), timeout=20,
             message="frontends gone after their director")


async def test_an_experiment_runs_with_every_call_through_a_frontend(
        tmp_path: Path, processes: list[Process]) -> None:
    async with running_director(tmp_path, tls=TLSSettings(insecure=True),
                                route="frontend") as running:
        assert running.port is not None
        for i in range(2):
            processes.append(envoy_process(tmp_path, f"env{i}", running.port, index=i,
                                           count=2).start())

        def experiment() -> tuple[str, float, dict[str, np.ndarray]]:
            with DirectorClient(running.address, client_id="alice", timeout=10) as client:
                wait_for(lambda: sum(e.online for e in client.envoys()) == 2, timeout=60,
                         message="two envoys online")
                archive, initial = experiment_archive(Plan(task="digits-logreg", rounds=2))
                client.submit("relayed", archive, collaborators=["env0", "env1"],
                              initial_model=initial)
                final = client.wait("relayed", timeout=120)
                return final.status, final.best_metrics["accuracy"], client.model("relayed")

        status, accuracy, model = await asyncio.to_thread(experiment)
        assert status == "finished", status
        assert accuracy > 0.8
        assert model["weights"].shape == (64, 10)
