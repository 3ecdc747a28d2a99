"""Collaborator runtimes: a local subprocess (local mode, tests) or a Pod (Kubernetes)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedkube.api.config import EnvoyConfig
from fedkube.collaborator.lifetime import ENVOY_PID
from fedkube.envoy_agent.pods import PodPlacement, build_collaborator_pod
from fedkube.envoy_agent.runtime import CollaboratorFailed, CollaboratorJob, Runtime

log = logging.getLogger(__name__)


def _tls_args(config: EnvoyConfig) -> list[str]:
    tls = config.tls
    if tls.insecure:
        return ["--insecure"]
    return ["--ca", str(tls.ca), "--cert", str(tls.cert), "--key", str(tls.key)]


def _last_error(text: str) -> str:
    """The exception line of a traceback, or the last line of output."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith((" ", "\t", "Traceback")) and ("Error" in line or
                                                              "Exception" in line):
            return line.strip()
    return lines[-1].strip() if lines else "no output"


def collaborator_environment(parent: Mapping[str, str],
                             cuda_devices: Sequence[int]) -> dict[str, str]:
    """The collaborator's environment: the envoy's, limited to the envoy's GPUs when it
    names some. An envoy that names none owns whatever its own environment shows it (as
    its NVML monitor does), so the collaborator inherits that unchanged."""
    env = dict(parent)
    if cuda_devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, cuda_devices))
    return env


class ProcessRuntime:
    """Runs the collaborator as `fedkube collaborator run`, seeing only the envoy's GPUs."""

    def __init__(self, config: EnvoyConfig) -> None:
        self.config = config

    async def run(self, job: CollaboratorJob) -> None:
        job.work_dir.mkdir(parents=True, exist_ok=True)
        options = [arg for key, value in self.config.shard.options.items()
                   for arg in ("--shard-option", f"{key}={value}")]
        args = [sys.executable, "-m", "fedkube.cli", "--log-format", "plain", "collaborator",
                "run", "--director", self.config.director, "--experiment", job.experiment,
                "--name", job.collaborator, "--archive", str(job.archive), "--work-dir",
                str(job.work_dir), "--shard", self.config.shard.loader, *options,
                *_tls_args(self.config)]
        env = collaborator_environment(os.environ, job.cuda_devices)
        env[ENVOY_PID] = str(os.getpid())  # the collaborator dies with this envoy
        log_path = job.work_dir / "collaborator.log"
        with log_path.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(*args, stdout=sink,
                                                           stderr=asyncio.subprocess.STDOUT,
                                                           env=env)
            try:
                code = await process.wait()
            except asyncio.CancelledError:
                process.kill()
                await process.wait()
                raise
        output = log_path.read_text(errors="replace")
        if self.config.work_dir:
            (self.config.work_dir / f"{job.experiment}.collaborator.log").write_text(output)
        if code != 0:
            raise CollaboratorFailed(_last_error(output), code=code)


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

            from fedkube.kubeconfig import load_api_client

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
            await asyncio.to_thread(_delete_quietly, self.core, name, namespace)


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


def make_runtime(config: EnvoyConfig) -> Runtime:
    if config.runtime == "pod":
        return PodRuntime(config)
    return ProcessRuntime(config)
