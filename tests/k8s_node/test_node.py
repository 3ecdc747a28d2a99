"""The real node itself: it runs the fedkube image as a restricted Pod."""

from __future__ import annotations

import json

import pytest
import yaml

from fedkube.dev.node import FEDKUBE_IMAGE, NODE_NAME, RealNode, pod_manifest
from fedkube.dev.processes import wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.k8s_node]


def _phase(node: RealNode, name: str) -> str:
    return node.plane.kubectl("get", "pod", name, "-o", "jsonpath={.status.phase}",
                              check=False).stdout


def test_the_fedkube_image_runs_as_a_restricted_pod_on_the_real_node(real_node: RealNode) -> None:
    pod = pod_manifest("fedkube-version", FEDKUBE_IMAGE, ["fedkube", "--help"])
    real_node.plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))
    wait_for(lambda: _phase(real_node, "fedkube-version") in ("Succeeded", "Failed"),
             timeout=120, interval=0.5, message="the pod to finish")
    logs = real_node.plane.kubectl("logs", "fedkube-version").stdout
    assert _phase(real_node, "fedkube-version") == "Succeeded", logs
    assert "usage: fedkube" in logs
    status = json.loads(real_node.plane.kubectl("get", "pod", "fedkube-version", "-o",
                                                "json").stdout)
    assert status["spec"]["nodeName"] == NODE_NAME
