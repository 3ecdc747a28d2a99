"""The envoy's pod runtime against the real scheduler: collaborator Pods land on the
envoy's node with the GPUs the plan asks for, or fail the job with the scheduler's reason."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from fedkube.api.config import EnvoyConfig, PodSettings, TLSSettings
from fedkube.dev.cluster import ControlPlane
from fedkube.dev.processes import wait_for
from fedkube.envoy_agent.main import make_runtime
from fedkube.envoy_agent.pod_runtime import PodRuntime
from fedkube.envoy_agent.pods import pod_name
from fedkube.envoy_agent.runtime import CollaboratorFailed, CollaboratorJob

pytestmark = pytest.mark.k8s
# Collaborator Pods must pass Pod Security "restricted", so they run in such a namespace.
NAMESPACE = "collab-restricted"


@pytest.fixture(scope="module", autouse=True)
def restricted_namespace(cluster: ControlPlane) -> None:
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    cluster.kubectl("label", "--overwrite", "namespace", NAMESPACE,
                    "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/enforce-version=latest")


def _runtime(cluster: ControlPlane, node: str, *, unschedulable_after_s: float = 60.0
             ) -> PodRuntime:
    envoy = EnvoyConfig(name="hospital-b", director="digits-director.default.svc:50051",
                        tls=TLSSettings(insecure=True), runtime="pod",
                        work_dir=Path(tempfile.mkdtemp(prefix="hospital-b-")),
                        pod=PodSettings(namespace=NAMESPACE, node_name=node,
                                        image="fedkube:test",
                                        unschedulable_after_s=unschedulable_after_s))
    assert isinstance(make_runtime(envoy), PodRuntime)
    api = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(cluster.kubeconfig))
    return PodRuntime(envoy, core_api=client.CoreV1Api(api))


def _job(tmp_path: Path, gpus: int) -> CollaboratorJob:
    return CollaboratorJob(experiment="default.digits", collaborator="hospital-b",
                           archive=tmp_path / "archive.zip", work_dir=tmp_path,
                           cuda_devices=(), gpus=gpus)


async def test_collaborator_pod_gets_its_gpus_on_the_envoys_node(
        cluster: ControlPlane, tmp_path: Path) -> None:
    runtime = _runtime(cluster, "gpu-node-2")
    task = asyncio.create_task(runtime.run(_job(tmp_path, gpus=2)))

    def pod() -> dict[str, Any]:
        out = cluster.kubectl("get", "pod", pod_name(_job(tmp_path, gpus=2)), "-n", NAMESPACE,
                              "-o", "json",
                              check=False)
        return dict(json.loads(out.stdout)) if out.returncode == 0 else {}

    await asyncio.to_thread(
        wait_for, lambda: task.done() or pod().get("status", {}).get("phase") == "Running",
        timeout=60, message="collaborator pod Running")
    assert not task.done(), task
    found = pod()
    assert found["spec"]["nodeName"] == "gpu-node-2"
    container = found["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert container["args"][container["args"].index("--name") + 1] == "hospital-b"
    # Stopping the job (the envoy cancels it when the experiment ends) removes the Pod.
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await asyncio.to_thread(wait_for, lambda: not pod(), timeout=60,
                            message="collaborator pod deleted")


async def test_pod_asking_more_gpus_than_the_node_has_fails_the_job(
        cluster: ControlPlane, tmp_path: Path) -> None:
    runtime = _runtime(cluster, "gpu-node-2", unschedulable_after_s=1.0)
    with pytest.raises(CollaboratorFailed) as failure:
        await asyncio.wait_for(runtime.run(_job(tmp_path, gpus=6)), timeout=60)
    message = str(failure.value)
    assert "cannot be scheduled on gpu-node-2" in message
    assert "Insufficient nvidia.com/gpu" in message
