"""Shared fixtures: certificates, in-process directors on loopback, the OpenFL 1.6 peer."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fedkube.api.config import TLSSettings
from fedkube.dev.processes import Process
from fedkube.transport import certs
from tests.helpers import CertDir, RunningDirector, running_director

if TYPE_CHECKING:
    from tests.test_openfl_experiments import References

DEFAULT_OPENFL_PYTHON = Path.home() / ".cache/fedkube/openfl-1.6-venv/bin/python"


@pytest.fixture(scope="session")
def openfl_python() -> Path:
    """The interpreter of the OpenFL 1.6 virtualenv that `make openfl` installs."""
    path = Path(os.environ.get("FEDKUBE_OPENFL_PYTHON", DEFAULT_OPENFL_PYTHON))
    if not path.exists():
        pytest.fail(f"OpenFL 1.6 peer not installed at {path}: run `make openfl` "
                    "(make test does it)")
    return path


@pytest.fixture(scope="session")
def openfl_references(tmp_path_factory: pytest.TempPathFactory, openfl_python: Path
                      ) -> References:
    """The OpenFL experiment of tests/openfl_workspace on OpenFL's own director, each
    setting run once per session: what the same experiment on fedkube is held to."""
    from tests.test_openfl_experiments import References

    return References(tmp_path_factory, openfl_python)


@pytest.fixture(scope="session")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> CertDir:
    """A CA with certificates for the director, envoys env1..env3, owners alice and bob,
    admins root and alice (alice-admin), a collaborator-only certificate for env1 (collab1)
    and one with no role."""
    path = tmp_path_factory.mktemp("certs")
    ca = certs.load_or_create_ca(path)
    certs.write_pair(path, "director", certs.issue(ca, "localhost", hosts=["127.0.0.1"],
                                                   role="director"))
    for name in ("env1", "env2", "env3"):
        certs.write_pair(path, name, certs.issue(ca, name, role="envoy"))
    for name in ("alice", "bob"):
        certs.write_pair(path, name, certs.issue(ca, name, role="owner"))
    certs.write_pair(path, "root", certs.issue(ca, "root", role="admin"))
    # An admin with the owner alice's name: another principal (identity is role and CN).
    certs.write_pair(path, "alice-admin", certs.issue(ca, "alice", role="admin"))
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


# How the director fixtures' tests reach it: on its own port, or only through one of its
# frontends (fedkube.director.frontend_process), given a port of its own, so that every call is
# answered there or relayed, and each test shows the same behaviour both ways. The frontend
# route starts a frontend process: slow, so the fast loop runs the direct route only.
ROUTES = ["direct", pytest.param("frontend", marks=pytest.mark.slow)]


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
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


