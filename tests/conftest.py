"""Shared fixtures: certificates, in-process directors on loopback, the OpenFL 1.6 peer."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedkube.api.config import DirectorConfig, TLSSettings
from fedkube.client import DirectorClient
from fedkube.director.frontends import stop_frontend
from fedkube.director.server import DirectorServer
from fedkube.local import Process, director_process, envoy_process, free_port, wait_for
from fedkube.transport import certs

DEFAULT_OPENFL_PYTHON = Path.home() / ".cache/fedkube/openfl-1.6-venv/bin/python"


@pytest.fixture(scope="session")
def openfl_python() -> Path:
    """The interpreter of the OpenFL 1.6 virtualenv that `make openfl` installs."""
    path = Path(os.environ.get("FEDKUBE_OPENFL_PYTHON", DEFAULT_OPENFL_PYTHON))
    if not path.exists():
        pytest.fail(f"OpenFL 1.6 peer not installed at {path}: run `make openfl` "
                    "(make test does it)")
    return path


def served_rpcs() -> list[tuple[str, Any]]:
    """Every RPC the director's port serves, as (path, method descriptor)."""
    from fedkube.proto import aggregator_pb2, director_pb2, streaming_pb2

    found = []
    for module, service in ((director_pb2, "Director"), (aggregator_pb2, "Aggregator"),
                            (streaming_pb2, "TensorStream")):
        descriptor = module.DESCRIPTOR.services_by_name[service]
        found += [(f"/{descriptor.full_name}/{method.name}", method)
                  for method in descriptor.methods]
    return found


@dataclass(frozen=True)
class CertDir:
    path: Path

    def settings(self, name: str) -> TLSSettings:
        return TLSSettings(ca=self.path / "ca.crt", cert=self.path / f"{name}.crt",
                           key=self.path / f"{name}.key")


@pytest.fixture(scope="session")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> CertDir:
    """A CA with certificates for the director, envoys env1..env3, owners alice and bob,
    admin root, a collaborator-only certificate for env1 (collab1) and one with no role."""
    path = tmp_path_factory.mktemp("certs")
    ca = certs.load_or_create_ca(path)
    certs.write_pair(path, "director", certs.issue(ca, "localhost", hosts=["127.0.0.1"],
                                                   role="director"))
    for name in ("env1", "env2", "env3"):
        certs.write_pair(path, name, certs.issue(ca, name, role="envoy"))
    for name in ("alice", "bob"):
        certs.write_pair(path, name, certs.issue(ca, name, role="owner"))
    certs.write_pair(path, "root", certs.issue(ca, "root", role="admin"))
    certs.write_pair(path, "collab1", certs.issue(ca, "env1", role="collaborator"))
    certs.write_pair(path, "norole", certs.issue(ca, "env1"))
    return CertDir(path)


@pytest.fixture(scope="session")
def rogue_cert_dir(tmp_path_factory: pytest.TempPathFactory) -> CertDir:
    """Certificates from another CA, for the same names."""
    path = tmp_path_factory.mktemp("rogue")
    ca = certs.load_or_create_ca(path)
    for name, role in (("env1", "envoy"), ("alice", "owner")):
        certs.write_pair(path, name, certs.issue(ca, name, role=role))
    return CertDir(path)


@dataclass
class RunningDirector:
    server: DirectorServer
    port: int | None = None  # where tests call it, when not its own port

    @property
    def address(self) -> str:
        return f"localhost:{self.port or self.server.port}"


async def start_director(tmp: Path, *, tls: TLSSettings, period: float = 2.0,
                         sample_shape: list[str] | None = None,
                         frontends: int = 0) -> RunningDirector:
    config = DirectorConfig(host="127.0.0.1", port=0, data_dir=tmp / "director",
                            sample_shape=sample_shape or ["8", "8"], target_shape=["1"],
                            health_check_period=period, tls=tls, frontends=frontends)
    server = DirectorServer(config)
    await server.start()
    return RunningDirector(server)


# How the director fixtures' tests reach it: on its own port, or only through one of its
# frontends (fedkube.director.frontend), given a port of its own, so that every call is
# answered there or relayed, and each test shows the same behaviour both ways.
ROUTES = ["direct", "frontend"]


@contextlib.asynccontextmanager
async def running_director(tmp: Path, *, tls: TLSSettings,
                           route: str = "direct") -> AsyncIterator[RunningDirector]:
    running = await start_director(tmp, tls=tls, frontends=int(route == "frontend"))
    frontend = None
    try:
        if route == "frontend":
            assert running.server.frontends is not None
            running.port = free_port()
            frontend = await running.server.frontends.spawn(running.port)
        yield running
    finally:
        if frontend is not None:
            await stop_frontend(frontend)
        await running.server.stop(None)


@pytest.fixture(params=ROUTES)
async def director(tmp_path: Path, request: pytest.FixtureRequest
                   ) -> AsyncIterator[RunningDirector]:
    async with running_director(tmp_path, tls=TLSSettings(insecure=True),
                                route=request.param) as running:
        yield running


@pytest.fixture(params=ROUTES)
async def mtls_director(tmp_path: Path, cert_dir: CertDir, request: pytest.FixtureRequest
                        ) -> AsyncIterator[RunningDirector]:
    async with running_director(tmp_path, tls=cert_dir.settings("director"),
                                route=request.param) as running:
        yield running


# Read by the tests' slow task: the slow machine of a straggler, not a synchronisation.
DELAY_ENV = "FEDKUBE_TEST_TRAIN_DELAY_S"


def start_federation(tmp_path: Path, processes: list[Process], envoys: int, *,
                     delays: dict[int, float] | None = None) -> tuple[int, DirectorClient,
                                                                      list[Process]]:
    """A director and envoys env0..env{n-1} on digits shards as real processes, all online;
    its port, a client as owner alice, and the envoys. `delays` slows envoys' training
    (seconds, by index) for tasks that read DELAY_ENV."""
    port = free_port()
    processes.append(director_process(tmp_path, port, period=1.0).start())
    started = []
    for i in range(envoys):
        envoy = envoy_process(tmp_path, f"env{i}", port, index=i, count=envoys)
        envoy.env[DELAY_ENV] = str((delays or {}).get(i, 0.0))
        processes.append(envoy.start())
        started.append(envoy)
    client = DirectorClient(f"localhost:{port}", client_id="alice", timeout=10)

    def online() -> bool:
        try:
            return sum(e.online for e in client.envoys()) == envoys
        except grpc.RpcError:
            return False

    wait_for(online, timeout=60, message=f"{envoys} envoys online")
    return port, client, started



@pytest.fixture
def processes(request: pytest.FixtureRequest) -> Iterator[list[Process]]:
    """Processes a test starts; stopped afterwards, their logs shown if the test failed."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for process in started:
            print(f"----- {process.name} ({process.log_path}) -----\n{process.output()[-4000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


async def eventually(predicate: Callable[[], bool], *, within: float, message: str) -> None:
    """wait_for for a condition that this event loop's director must bring about."""
    try:
        async with asyncio.timeout(within):
            # Polled: the director's state signals nothing when it changes.
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise TimeoutError(f"timed out after {within}s waiting for {message}") from None
