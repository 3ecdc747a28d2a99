"""The Kubernetes collaborator runtime: a Pod on the envoy's own node (fedkube.envoy_agent.pods
builds it), watched to its end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from fedkube.api.config import EnvoyConfig
from fedkube.envoy_agent.pods import PodPlacement, build_collaborator_pod
from fedkube.envoy_agent.runtime import CollaboratorFailed, CollaboratorJob

log = logging.getLogger(__name__)
LOG_TAIL_LINES = 200  # of a collaborator Pod's log, kept in the envoy's when it ends


class PodRuntime:
    """Runs the collaborator as a Pod on the envoy's own node, requesting the plan's GPUs,
    and watches it to its end. A Pod that fails, or stays unschedulable past
    `unschedulable_after_s`, fails the experiment with the reason."""

    POLL_S = 0.5

    def __init__(self, config: EnvoyConfig, *, core_api: Any | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        settings = config.pod
        env = os.environ
        namespace = settings.namespace or env.get("POD_NAMESPACE")
        node = settings.node_name or env.get("NODE_NAME")
        image = settings.image or env.get("FEDKUBE_IMAGE")
        if not (namespace and node and image):
            raise ValueError("the pod runtime needs a namespace, node name and image (pod: "
                             "settings, or POD_NAMESPACE, NODE_NAME, FEDKUBE_IMAGE)")
        self.settings = settings
        self.work_dir = config.work_dir
        self.placement = PodPlacement(
            namespace=namespace, node_name=node, image=image, director=config.director,
            loader=config.shard.loader,
            options={k: str(v) for k, v in config.shard.options.items()},
            tls_secret=settings.tls_secret, ca_config_map=settings.ca_config_map,
            certificate_account=settings.certificate_account,
            owner_pod=settings.owner_pod or env.get("POD_NAME"),
            owner_uid=settings.owner_uid or env.get("POD_UID"))
        self._core = core_api
        self.clock = clock

    @property
    def core(self) -> Any:
        if self._core is None:
            from kubernetes import client

            from fedkube.kube.config import load_api_client

            self._core = client.CoreV1Api(load_api_client())
        return self._core

    async def run(self, job: CollaboratorJob) -> None:
        manifest = build_collaborator_pod(job, self.placement)
        name, namespace = manifest["metadata"]["name"], self.placement.namespace
        await asyncio.to_thread(self.core.create_namespaced_pod, namespace, manifest)
        log.info("experiment %s: collaborator pod %s created on %s (%d GPUs)", job.experiment,
                 name, self.placement.node_name, job.gpus)
        unschedulable_since: float | None = None
        try:
            while True:
                pod = await asyncio.to_thread(self.core.read_namespaced_pod, name, namespace)
                phase = pod.status.phase
                if phase == "Succeeded":
                    return
                if phase == "Failed":
                    raise CollaboratorFailed(f"collaborator pod {name} failed: "
                                             f"{_pod_failure(pod)}")
                scheduled = next((c for c in pod.status.conditions or []
                                  if c.type == "PodScheduled"), None)
                if scheduled is not None and scheduled.status == "False":
                    unschedulable_since = unschedulable_since or self.clock()
                    if self.clock() - unschedulable_since >= self.settings.unschedulable_after_s:
                        raise CollaboratorFailed(
                            f"collaborator pod {name} cannot be scheduled on "
                            f"{self.placement.node_name}: {scheduled.message}")
                else:
                    unschedulable_since = None
                await asyncio.sleep(self.POLL_S)
        finally:
            await asyncio.to_thread(self._keep_logs, name, job)
            await asyncio.to_thread(_delete_quietly, self.core, name, namespace)

    def _keep_logs(self, name: str, job: CollaboratorJob) -> None:
        """The Pod's last lines into the envoy's own log (and, as the process runtime
        keeps them, a file): deleting the Pod would lose them, and with them the rounds
        `kubectl logs` of the envoy then shows. Best effort: never fails the run."""
        try:
            text = self.core.read_namespaced_pod_log(name, self.placement.namespace,
                                                     tail_lines=LOG_TAIL_LINES)
        except Exception as exc:  # a Pod that never ran, a node that serves no logs
            log.warning("could not keep the logs of collaborator pod %s: %s", name, exc)
            return
        lines = [line for line in str(text).splitlines() if line.strip()]
        for line in lines:
            log.info("collaborator %s: %s", name, line)
        with contextlib.suppress(OSError):
            self.work_dir.mkdir(parents=True, exist_ok=True)
            (self.work_dir / f"{job.experiment}.collaborator.log").write_text(
                "\n".join(lines) + "\n")


def _pod_failure(pod: Any) -> str:
    for status in pod.status.container_statuses or []:
        terminated = status.state and status.state.terminated
        if terminated:
            return terminated.message or f"exit code {terminated.exit_code} ({terminated.reason})"
    return pod.status.message or pod.status.reason or "unknown reason"


def _delete_quietly(core: Any, name: str, namespace: str) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    except ApiException as exc:
        if exc.status != 404:
            log.warning("could not delete collaborator pod %s: %s", name, exc.reason)
