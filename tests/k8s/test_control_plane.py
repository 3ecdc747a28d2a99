"""The test control plane itself: real components, fake GPU nodes, real scheduling."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedkube.dev.cluster import ControlPlane
from fedkube.dev.processes import wait_for

pytestmark = pytest.mark.k8s


def get(cluster: ControlPlane, *args: str) -> dict[str, Any]:
    return dict(json.loads(cluster.kubectl("get", *args, "-o", "json").stdout))


def test_versions_are_stamped(cluster: ControlPlane) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["clientVersion"]["gitVersion"].startswith("v1.")
    assert version["serverVersion"]["gitVersion"] == version["clientVersion"]["gitVersion"]


def test_gpu_nodes_have_capacity_and_labels(cluster: ControlPlane) -> None:
    nodes = {n["metadata"]["name"]: n for n in get(cluster, "nodes")["items"]}
    assert nodes["gpu-node-1"]["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert nodes["gpu-node-2"]["status"]["allocatable"]["nvidia.com/gpu"] == "4"
    assert "nvidia.com/gpu" not in nodes["cpu-node-1"]["status"]["allocatable"]
    assert nodes["gpu-node-2"]["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"


def test_gpu_daemonset_lands_only_on_gpu_nodes(cluster: ControlPlane) -> None:
    cluster.apply([{
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "gpu-probe", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "gpu-probe"}},
            "template": {
                "metadata": {"labels": {"app": "gpu-probe"}},
                "spec": {
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                     "effect": "NoSchedule"}],
                    "containers": [{"name": "probe", "image": "busybox"}],
                },
            },
        },
    }])

    def placed() -> set[str]:
        pods = get(cluster, "pods", "-l", "app=gpu-probe")["items"]
        return {p["spec"].get("nodeName", "") for p in pods
                if p.get("status", {}).get("phase") == "Running"}

    wait_for(lambda: placed() == {"gpu-node-1", "gpu-node-2"}, timeout=60,
             message="probe pods running on both GPU nodes")
    cluster.kubectl("delete", "daemonset", "gpu-probe")


def test_pod_asking_for_too_many_gpus_stays_pending(cluster: ControlPlane) -> None:
    cluster.apply([{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "greedy", "namespace": "default"},
        "spec": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "containers": [{"name": "c", "image": "busybox",
                            "resources": {"limits": {"nvidia.com/gpu": "16"}}}],
        },
    }])

    def unschedulable() -> bool:
        events = get(cluster, "events", "--field-selector", "involvedObject.name=greedy")
        return any(e["reason"] == "FailedScheduling" and "Insufficient nvidia.com/gpu"
                   in e["message"] for e in events["items"])

    wait_for(unschedulable, timeout=60, message="FailedScheduling for 16 GPUs")
    assert get(cluster, "pod", "greedy")["status"]["phase"] == "Pending"
    cluster.kubectl("delete", "pod", "greedy", "--wait=false")


def test_pod_that_fits_is_bound_to_a_gpu_node(cluster: ControlPlane) -> None:
    cluster.apply([{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "six-gpus", "namespace": "default"},
        "spec": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "containers": [{"name": "c", "image": "busybox",
                            "resources": {"limits": {"nvidia.com/gpu": "6"}}}],
        },
    }])
    wait_for(lambda: get(cluster, "pod", "six-gpus")["status"].get("phase") == "Running",
             timeout=60, message="six-gpus running")
    assert get(cluster, "pod", "six-gpus")["spec"]["nodeName"] == "gpu-node-1"
