"""A real control plane for the session (see fedkube/devcluster.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedkube.devcluster import ControlPlane

ROOT = Path(__file__).resolve().parents[2]


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


def restricted_namespace(cluster: ControlPlane, namespace: str) -> None:
    """Our CRDs, established, and a namespace enforcing Pod Security "restricted": every
    Pod the operator and envoys make (director, envoys, collaborators) must be admitted
    under it, or the tests find none."""
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl("label", "namespace", namespace,
                    "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/enforce-version=latest")
