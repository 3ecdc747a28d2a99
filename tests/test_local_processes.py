"""Directors and envoys as real processes: restarts, outages, refusals, bad configs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from fedkube.dev.processes import (
    Process,
    director_process,
    envoy_process,
    free_port,
    port_open,
    wait_for,
)
from fedkube.director.store import SqliteStore
from tests.helpers import CertDir, envoys, start

pytestmark = pytest.mark.slow  # every test starts fedkube processes
PERIOD = 1.0


def online(port: int, *names: str) -> bool:
    current = envoys(port)
    return all(name in current and current[name].online for name in names)


def persisted_shards(work: Path) -> list[str]:
    """The shards the director's SQLite store holds (read beside the running director)."""
    path = work / "director" / "director.sqlite3"
    if not path.exists():
        return []
    store = SqliteStore(path)
    try:
        return [record.name for record in store.shards()]
    finally:
        store.close()


def test_director_restart_keeps_shards_without_restarting_envoys(
        tmp_path: Path, processes: list[Process]) -> None:
    port = free_port()
    director = start(processes, director_process(tmp_path, port, period=PERIOD))
    envoy = start(processes, envoy_process(tmp_path, "env1", port, index=0, count=2))
    wait_for(lambda: online(port, "env1"), timeout=30, message="env1 online")
    # Registrations are written with the health timestamps, within half a period.
    wait_for(lambda: persisted_shards(tmp_path) == ["env1"], timeout=10,
             message="env1's registration written")
    director.kill()
    assert not port_open(port)
    restarted = start(processes, director_process(tmp_path, port, period=PERIOD,
                                                  name="director-restarted"))
    wait_for(lambda: port_open(port), timeout=30, message="director back")
    # The registry came back from the store, before any envoy re-registered.
    assert "restored 1 shards" in restarted.output()
    wait_for(lambda: online(port, "env1"), timeout=4 * PERIOD + 10, message="env1 online again")
    assert envoy.running
    assert "accepted shard env1" not in restarted.output()  # health check, not re-registration


def test_a_registration_the_director_lost_comes_back_from_its_envoy(
        tmp_path: Path, processes: list[Process]) -> None:
    """The worst case of writing registrations behind: the director's store is gone. The
    envoy's next health check is told NOT_FOUND and it registers again."""
    port = free_port()
    director = start(processes, director_process(tmp_path / "a", port, period=PERIOD))
    envoy = start(processes, envoy_process(tmp_path, "env1", port, index=0, count=2))
    wait_for(lambda: online(port, "env1"), timeout=30, message="env1 online")
    director.kill()
    fresh = start(processes, director_process(tmp_path / "b", port, period=PERIOD,
                                              name="director-fresh"))
    wait_for(lambda: online(port, "env1"), timeout=4 * PERIOD + 10,
             message="env1 online at a director that never saw it")
    assert "director forgot shard env1; registering again" in envoy.output()
    assert "accepted shard env1" in fresh.output()
    wait_for(lambda: persisted_shards(tmp_path / "b") == ["env1"], timeout=10,
             message="env1's registration written by the fresh director")


def test_thousands_of_envoys_registering_at_once_are_all_answered(
        tmp_path: Path, processes: list[Process]) -> None:
    """What a director restart brings: every envoy calls at once. gRPC's default cancels
    calls past 1,000 waiting to be taken up; the director queues them instead."""
    import asyncio

    import grpc

    from fedkube.proto import director_pb2, director_pb2_grpc

    port = free_port()
    start(processes, director_process(tmp_path, port, period=PERIOD))
    wait_for(lambda: port_open(port), timeout=30, message="director up")

    async def register_all(count: int) -> list[str]:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(4)]
        stubs = [director_pb2_grpc.DirectorStub(c) for c in channels]

        async def register(i: int) -> str:
            name = f"envoy-{i:04d}"
            try:
                reply = await stubs[i % 4].UpdateShardInfo(director_pb2.UpdateShardInfoRequest(
                    shard_info=director_pb2.ShardInfo(
                        node_info=director_pb2.NodeInfo(name=name), n_samples=1,
                        sample_shape=["8", "8"], target_shape=["1"])),
                    metadata=(("client_id", name),), timeout=60)
                return "accepted" if reply.accepted else "refused"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
        try:
            return await asyncio.gather(*(register(i) for i in range(count)))
        finally:
            for channel in channels:
                await channel.close(None)

    outcomes = asyncio.run(register_all(4000))
    assert outcomes.count("accepted") == 4000, {o: outcomes.count(o) for o in set(outcomes)}
    assert len(envoys(port)) == 4000


def test_envoy_survives_director_outage(tmp_path: Path, processes: list[Process]) -> None:
    port = free_port()
    director = start(processes, director_process(tmp_path, port, period=PERIOD))
    envoy = start(processes, envoy_process(tmp_path, "env1", port, index=0, count=2))
    wait_for(lambda: online(port, "env1"), timeout=30, message="env1 online")
    director.stop()
    outage = 8 * PERIOD  # several periods with nobody answering
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not envoy.running, timeout=outage, message="envoy exit")
    assert envoy.running, envoy.output()
    assert "unreachable" in envoy.output()
    start(processes, director_process(tmp_path, port, period=PERIOD, name="director-back"))
    wait_for(lambda: port_open(port), timeout=30, message="director back")
    wait_for(lambda: online(port, "env1"), timeout=2 * PERIOD + 0.5,
             message="env1 online within two periods of the director's return")
    assert "reachable again" in envoy.output()


def test_shape_mismatch_refuses_shard_with_reason_and_exit_status(
        tmp_path: Path, processes: list[Process]) -> None:
    port = free_port()
    start(processes, director_process(tmp_path, port, period=PERIOD,
                                      extra=["--sample-shape", "28,28"]))
    envoy = start(processes, envoy_process(tmp_path, "env1", port, index=0, count=2))
    assert envoy.wait(timeout=60) == 3
    assert "shard not accepted" in envoy.output()
    assert "this federation needs ['28', '28']" in envoy.output()
    assert envoys(port) == {}


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedkube.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_bad_config_files_get_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "director.yaml"
    bad.write_text("port: 99999\nhealth_check_period: -1\ncolour: blue\ntls: {insecure: true}\n")
    result = run_cli("director", "start", "--config", str(bad))
    assert result.returncode == 2
    assert "port: Input should be less than or equal to 65535" in result.stderr
    assert "health_check_period: Input should be greater than 0" in result.stderr
    assert "colour: Extra inputs are not permitted" in result.stderr

    envoy = tmp_path / "envoy.yaml"
    envoy.write_text("name: env1\ndirector: nohostport\ntls: {insecure: true}\n")
    result = run_cli("envoy", "start", "--config", str(envoy))
    assert result.returncode == 2
    assert "director: String should match pattern" in result.stderr

    result = run_cli("director", "start", "--ca", str(tmp_path / "missing.crt"))
    assert result.returncode == 2
    assert "mTLS needs ca, cert and key" in result.stderr

    envoy.write_text("name: env1\ndirector: localhost:1\ntls: {insecure: true}\n"
                     "shard: {loader: nosuch}\n")
    result = run_cli("envoy", "start", "--config", str(envoy))
    assert result.returncode == 2
    assert "unknown shard loader 'nosuch'" in result.stderr

    envoy.write_text("- a list\n")
    result = run_cli("envoy", "start", "--config", str(envoy))
    assert result.returncode == 2 and "must be a mapping" in result.stderr


def test_shards_command_json_and_mtls(tmp_path: Path, processes: list[Process],
                                      cert_dir: object) -> None:

    assert isinstance(cert_dir, CertDir)
    port = free_port()
    start(processes, director_process(tmp_path, port, period=PERIOD, cert_dir=cert_dir.path))
    start(processes, envoy_process(tmp_path, "env2", port, index=1, count=2,
                                   cert_dir=cert_dir.path))
    tls = ["--ca", str(cert_dir.path / "ca.crt"), "--cert", str(cert_dir.path / "alice.crt"),
           "--key", str(cert_dir.path / "alice.key")]

    def listed() -> list[dict[str, object]]:
        result = run_cli("shards", "--director", f"localhost:{port}", *tls, "--output", "json")
        if result.returncode != 0:
            return []
        import json

        return list(json.loads(result.stdout))

    wait_for(lambda: bool(listed()) and bool(listed()[0]["online"]), timeout=30,
             message="env2 listed online")
    (row,) = listed()
    assert row["name"] == "env2" and row["sample_shape"] == ["8", "8"]
    assert row["cuda_devices"] == []
    table = run_cli("shards", "--director", f"localhost:{port}", *tls)
    assert table.returncode == 0 and "env2" in table.stdout
