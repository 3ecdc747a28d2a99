"""The local collaborator runtime: `fedkube collaborator run` as a subprocess of the
envoy (local mode, tests), seeing only the envoy's GPUs and dying with the envoy."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from fedkube.api.config import EnvoyConfig
from fedkube.api.environment import ENVOY_PID
from fedkube.envoy_agent.runtime import CollaboratorFailed, CollaboratorJob

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
        if self.config.openfl_python is not None:
            args += ["--openfl-python", str(self.config.openfl_python)]
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
