"""A shard's policy: what its data owner lets run on the data (fedkube.review applies it).

The policy is declarative (a YAML file for `fedkube envoy start`; `Shard.spec.policy` on
Kubernetes): which owners may use the shard, which built-in tasks, whether the
experiment's own code (`archive:MODULE` tasks, every OpenFL experiment) and its
`requirements.txt` may run, limits on rounds, GPUs, CPU and memory, and whether the data
owner approves each experiment by hand. By default only built-in tasks run, and nothing
is installed: the data owner opts in.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from fedkube.api.compute import RESOURCE_QUANTITY
from fedkube.api.errors import ConfigError
from fedkube.api.plan import USER_TASK_PREFIX

OPENFL_TASK = "openfl"  # the task name a Submission of an OpenFL experiment carries
# The rules `review` applies, in order; then the hooks (callback, command), then approval.
RULES_ORDER = ("owners", "tasks", "userCode", "requirements", "maxRounds", "maxGpus",
               "maxCpu", "maxMemory")
SHA256 = re.compile(r"^(sha256:)?[0-9a-fA-F]{64}$")
CALLBACK = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


# -- quantities ---------------------------------------------------------------------------

_QUANTITY = re.compile(r"^(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
                       r"(?:(?P<exponent>[eE][+-]?[0-9]+)|(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei"
                       r"|n|u|m|k|M|G|T|P|E))?$")
_SUFFIXES = {"": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"),
             "m": Decimal("1e-3"), "k": Decimal("1e3"), "M": Decimal("1e6"),
             "G": Decimal("1e9"), "T": Decimal("1e12"), "P": Decimal("1e15"),
             "E": Decimal("1e18"), **{s: Decimal(1024) ** (i + 1) for i, s in
                                      enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))}}


def parse_quantity(text: str | int | float) -> Decimal:
    """A Kubernetes quantity's value: '500m' -> 0.5, '1Gi' -> 1073741824, 2 -> 2."""
    match = _QUANTITY.match(str(text).strip())
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 2, 4Gi)")
    try:
        number = Decimal(match["number"])
        if match["exponent"]:
            return number * Decimal(10) ** int(match["exponent"][1:])
    except (InvalidOperation, ValueError, OverflowError) as exc:
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from exc
    return number * _SUFFIXES[match["suffix"] or ""]


def _quantity_text(value: object) -> object:
    """`maxCpu: 2` or `0.5` in YAML is a number: a quantity all the same."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _parses(value: str) -> str:
    parse_quantity(value)
    return value


# An int-or-string with a pattern, as the quantities of fedkube.api.resources.
Quantity = Annotated[str, BeforeValidator(_quantity_text),
                     Field(pattern=RESOURCE_QUANTITY, max_length=64), AfterValidator(_parses),
                     WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}],
                                     "pattern": RESOURCE_QUANTITY, "maxLength": 64,
                                     "x-kubernetes-int-or-string": True})]


# -- the policy ---------------------------------------------------------------------------

class ShardPolicy(BaseModel):
    """What the data owner lets run on this shard. Unset: built-in tasks only, for any
    owner, with no requirements.txt, no limits, and automatic approval."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True,
                              extra="forbid", frozen=True)

    owners: list[Annotated[str, Field(min_length=1, max_length=253)]] | None = Field(
        default=None, max_length=10_000, description=(
            "model owners who may use this shard, as the director names them: under mTLS "
            "a certificate's role and common name (owner:alice, admin:root), in insecure "
            "mode the client id (alice); default: anyone"))
    tasks: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, max_length=1000, description=(
            "built-in tasks allowed (digits-logreg, digits-mlp, ...); default: every "
            "built-in. Experiments' own code is allowed by userCode or archives"))
    archives: list[Annotated[str, Field(pattern=SHA256.pattern)]] = Field(
        default_factory=list, max_length=10_000, description=(
            "SHA-256 digests (hex, optionally sha256:) of archives allowed to run their "
            "own code even when userCode is false: the archive as the envoy receives it, "
            "`sha256sum archive.zip` of a fedkube archive (the director rewrites an "
            "OpenFL experiment's plan, so its digest differs per experiment)"))
    user_code: bool = Field(default=False, description=(
        "allow experiments to run their own code: fedkube tasks archive:MODULE, and every "
        "OpenFL experiment"))
    requirements: bool = Field(default=False, description=(
        "allow an experiment to install its requirements.txt (a fedkube plan's "
        "install_requirements, an OpenFL workspace's non-empty requirements.txt)"))
    require_hashes: bool = Field(default=False, description=(
        "with requirements: every requirement must be pinned with --hash (enforced when "
        "installing)"))
    max_rounds: int | None = Field(default=None, ge=1, le=100_000, description=(
        "the most rounds an experiment may train; default: no limit"))
    max_gpus: int | None = Field(default=None, ge=0, le=64, description=(
        "the most GPUs one collaborator may ask for; default: no limit"))
    max_cpu: Quantity | None = Field(default=None, description=(
        "the most CPU a collaborator's requests and limits may name (e.g. 4, 500m); "
        "default: no limit"))
    max_memory: Quantity | None = Field(default=None, description=(
        "the most memory a collaborator's requests and limits may name (e.g. 8Gi); "
        "default: no limit"))
    max_wall_time_seconds: int | None = Field(default=None, ge=1, description=(
        "the longest a collaborator may run before the envoy stops it; default: no limit"))
    approval: Literal["automatic", "manual"] = Field(default="automatic", description=(
        "automatic: an experiment that passes the rules and hooks runs; manual: it then "
        "waits for the data owner's approval"))
    review_command: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, min_length=1, max_length=256, description=(
            "argv of a command that reviews each experiment: it gets the plan, archive "
            "listing, owner, experiment, digest, task, rounds and gpus as JSON on stdin; "
            "exit 0 accepts, anything else refuses with its first line of output"))
    review_callback: str | None = Field(
        default=None, max_length=512, pattern=CALLBACK, description=(
            "module:function, called as OpenFL's review_plan_callback(file_name, "
            "file_path) with the plan file; a true result accepts"))
    pass_env: list[Annotated[str, Field(pattern=ENV_NAME, max_length=256)]] = Field(
        default_factory=list, max_length=256, description=(
            "names of the envoy's environment variables its collaborators get"))

    @field_validator("tasks")
    @classmethod
    def _built_in_tasks(cls, value: list[str] | None) -> list[str] | None:
        for task in value or ():
            if task.startswith(USER_TASK_PREFIX) or task == OPENFL_TASK:
                raise ValueError(f"{task!r}: tasks lists built-in tasks; allow experiments' "
                                 f"own code with userCode or archives")
        return value

    @field_validator("archives")
    @classmethod
    def _digests(cls, value: list[str]) -> list[str]:
        return [digest.removeprefix("sha256:").lower() for digest in value]

    @model_validator(mode="after")
    def _hashes_need_requirements(self) -> ShardPolicy:
        if self.require_hashes and not self.requirements:
            raise ValueError("requireHashes goes with requirements: true")
        return self


def one_line(text: str) -> str:
    return " ".join(text.split())


def load_policy(path: Path) -> ShardPolicy:
    """The policy in a YAML file (an empty file: the default policy). Raises ConfigError
    with one line naming the file and the first problem."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the shard policy {path}: {exc.strerror or exc}"
                          ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid shard policy {path}: not YAML{where}: "
                          f"{one_line(problem)}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid shard policy {path}: the top level must be a mapping")
    try:
        return ShardPolicy.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"invalid shard policy {path}: {where}: "
                          f"{one_line(first['msg'])}{more}") from exc


