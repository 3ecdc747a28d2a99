"""How an envoy runs an experiment's collaborator: the interface its runtimes implement."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedkube.api.compute import ComputeResources
from fedkube.api.errors import FedkubeError


@dataclass(frozen=True)
class CollaboratorJob:
    experiment: str
    collaborator: str
    archive: Path
    work_dir: Path
    cuda_devices: tuple[int, ...]
    gpus: int = 0  # what the plan asks per collaborator (the pod runtime requests them)
    resources: ComputeResources | None = None  # the Pod's other requests and limits


class CollaboratorFailed(FedkubeError):
    """The collaborator ended badly; the message goes to the director's SetExperimentFailed."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class Runtime(Protocol):
    async def run(self, job: CollaboratorJob) -> None:
        """Runs the collaborator to its end; raises CollaboratorFailed when it fails."""
