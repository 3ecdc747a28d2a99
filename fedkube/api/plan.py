"""The experiment plan: what `plan.yaml` in an experiment archive says."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedkube.api.compute import ComputeResources

PLAN_FILE = "plan.yaml"
REQUIREMENTS_FILE = "requirements.txt"
USER_TASK_PREFIX = "archive:"


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(min_length=1, max_length=200,
                      description="a built-in task (digits-logreg, digits-mlp) or "
                                  "'archive:MODULE', a module inside the archive")
    params: dict[str, Any] = Field(default_factory=dict)
    rounds: int = Field(default=10, ge=1, le=100_000)
    min_collaborators: int | None = Field(default=None, ge=1,
                                          description="quorum to close a round on timeout; "
                                                      "default: every collaborator")
    round_timeout_s: float = Field(default=600.0, gt=0)
    metric: str = Field(default="accuracy", min_length=1)
    higher_is_better: bool = True
    weighting: Literal["samples", "equal"] = "samples"
    gpus_per_collaborator: int = Field(default=0, ge=0, le=64,
                                       description="nvidia.com/gpu each collaborator Pod asks")
    collaborator_resources: ComputeResources | None = Field(
        default=None, description="each collaborator Pod's other requests and limits")
    install_requirements: bool = Field(
        default=False, description="the envoy installs the archive's requirements.txt into "
                                   "a virtualenv of this experiment before running it")

    @field_validator("task")
    @classmethod
    def _task_name(cls, value: str) -> str:
        if value.startswith(USER_TASK_PREFIX):
            module = value.removeprefix(USER_TASK_PREFIX)
            if not module.isidentifier():
                raise ValueError(f"{module!r} is not a Python module name")
        return value
