"""A control plane with one real kubelet node on this machine (fedkube.dev.node), for the
tests that run fedkube in containers. Starting it needs root, the Debian packages of
tools/k8s-testenv/host-packages.sh, and the binaries and images the Makefile builds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedkube.dev.cluster import SERVICE_CIDR, ControlPlane
from fedkube.dev.node import NODE_IP, RealNode, _run, node_binaries, node_images


# Package scope: the node and its Pods are gone before the rest of the suite runs.
@pytest.fixture(scope="package")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    bin_dir, images = node_binaries(), node_images()
    work = tmp_path_factory.mktemp("k8s-node")
    changes = RealNode.prepare_host(work)
    plane = ControlPlane(work / "plane", address=NODE_IP, nodes=())
    node = RealNode(work / "node", plane, bin_dir, images)
    try:
        # Before anything is sent: a ClusterIP without endpoints must be dropped here.
        routes = _run("ip", "route", "show", "type", "blackhole").stdout
        assert SERVICE_CIDR in routes, f"no blackhole route for {SERVICE_CIDR}: {routes}"
        plane.start()
        node.start()
    except Exception:
        print(plane.logs(), node.logs())
        node.stop()
        plane.stop()
        changes.restore()
        raise
    yield node
    problems: list[str] = []
    try:
        problems += node.stop()
    finally:
        try:
            plane.stop()
        finally:
            problems += changes.restore()
            node.clean()
    assert not problems, f"the host was not restored: {problems}"


@pytest.fixture(autouse=True)
def _show_node_logs_on_failure(request: pytest.FixtureRequest,
                               real_node: RealNode) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(real_node.diagnostics())
        print(real_node.plane.logs(), real_node.logs())
