"""A real control plane for the session (see fedkube/dev/cluster.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedkube.dev.cluster import ControlPlane


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("k8s"))
    try:
        plane.start()
    except Exception:
        print(plane.logs())
        plane.stop()
        raise
    yield plane
    plane.stop()


@pytest.fixture(autouse=True)
def _show_component_logs_on_failure(request: pytest.FixtureRequest,
                                    cluster: ControlPlane) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(cluster.logs())


