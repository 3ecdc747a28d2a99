"""The review of an experiment against a shard policy (fedkube.api.policy).

`describe` reads what an experiment's archive asks for (a `Submission`), and `review`
applies the rules in order (`RULES_ORDER`), then the review hooks, as OpenFL's
`review_plan_callback(file_name, file_path)` does on its envoy, but automatable: a Python
callable and a command the operator configures. The first refusal wins, with a reason
for the model owner that names the rule. `review` blocks (a review command may take up to
`REVIEW_TIMEOUT_S`): an asyncio caller runs it in a thread.

This module reads the archive and runs the hooks, nothing else: no gRPC, no network.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import os
import signal
import subprocess
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from fedkube.api.compute import ComputeResources
from fedkube.api.plan import PLAN_FILE, REQUIREMENTS_FILE, USER_TASK_PREFIX
from fedkube.api.policy import OPENFL_TASK, ShardPolicy, one_line, parse_quantity
from fedkube.openfl.workspace import (
    PLAN_PATH,
    OpenFLArchiveError,
    is_openfl_archive,
    load_config,
    prefers_cuda,
)
from fedkube.tasks.archive import ArchiveError, read_plan

GPU = "nvidia.com/gpu"
REVIEW_TIMEOUT_S = 60.0
MAX_REASON_CHARS = 500


# -- what an experiment asks for ----------------------------------------------------------

@dataclass(frozen=True)
class Submission:
    """What an experiment's archive asks of this shard, read without running it."""

    experiment: str
    owner: str
    archive: Path
    digest: str  # sha256 hex of the archive's bytes
    openfl: bool
    task: str  # the fedkube task, or OPENFL_TASK
    rounds: int
    gpus: int  # per collaborator
    user_code: bool
    requirements: bool
    resources: ComputeResources | None
    plan_text: str
    listing: list[str]

    @property
    def plan_name(self) -> str:
        return PurePosixPath(PLAN_PATH if self.openfl else PLAN_FILE).name

    def as_json(self) -> dict[str, Any]:
        """What a review command reads on stdin."""
        return {"plan": self.plan_text, "listing": self.listing, "owner": self.owner,
                "experiment": self.experiment, "digest": self.digest, "task": self.task,
                "rounds": self.rounds, "gpus": self.gpus, "openfl": self.openfl,
                "user_code": self.user_code, "requirements": self.requirements,
                "resources": (self.resources.model_dump(mode="json")
                              if self.resources else None)}


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _reading(archive: Path) -> Iterator[zipfile.ZipFile]:
    try:
        with zipfile.ZipFile(archive) as z:
            yield z
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, EOFError, ValueError,
            NotImplementedError, RuntimeError, zlib.error) as exc:
        if isinstance(exc, ArchiveError | OpenFLArchiveError):
            raise
        raise ArchiveError(f"cannot read the archive: {exc}") from exc


def _has_requirements(text: str) -> bool:
    return any(line.split("#", 1)[0].strip() for line in text.splitlines())


def _resource_gpus(resources: ComputeResources | None) -> int:
    if resources is None:
        return 0
    values = [resources.requests.get(GPU), resources.limits.get(GPU)]
    return max((int(parse_quantity(v)) for v in values if v is not None), default=0)


def describe(archive: Path, experiment: str, owner: str, *, devices: int = 1) -> Submission:
    """What the archive asks for. `devices`: the envoy's CUDA devices, all of which an
    OpenFL collaborator whose plan prefers CUDA gets. Raises ArchiveError or
    OpenFLArchiveError for an archive that cannot be read."""
    digest = _digest(archive)
    if is_openfl_archive(archive):
        with _reading(archive) as z:
            listing = z.namelist()
            plan_text = z.read(PLAN_PATH).decode()
            requirements = (REQUIREMENTS_FILE in listing
                            and _has_requirements(z.read(REQUIREMENTS_FILE).decode()))
        settings = load_config(plan_text).get("aggregator", {}).get("settings") or {}
        try:
            rounds = int(settings["rounds_to_train"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise OpenFLArchiveError("aggregator.settings.rounds_to_train is not a "
                                     "number") from None
        return Submission(experiment=experiment, owner=owner, archive=archive, digest=digest,
                          openfl=True, task=OPENFL_TASK, rounds=rounds,
                          gpus=devices if prefers_cuda(archive) else 0, user_code=True,
                          requirements=requirements, resources=None, plan_text=plan_text,
                          listing=listing)
    plan = read_plan(archive)
    with _reading(archive) as z:
        listing = z.namelist()
        plan_text = z.read(PLAN_FILE).decode()
    return Submission(experiment=experiment, owner=owner, archive=archive, digest=digest,
                      openfl=False, task=plan.task, rounds=plan.rounds,
                      gpus=max(plan.gpus_per_collaborator,
                               _resource_gpus(plan.collaborator_resources)),
                      user_code=plan.task.startswith(USER_TASK_PREFIX),
                      requirements=plan.install_requirements,
                      resources=plan.collaborator_resources, plan_text=plan_text,
                      listing=listing)


# -- the review ---------------------------------------------------------------------------

# Whose policy: a shard's (its data owner's) or the federation's (its admin's, on the
# director); the reasons say which.
Scope = Literal["shard", "federation"]


@dataclass(frozen=True)
class Verdict:
    decision: Literal["accepted", "refused", "awaiting"]
    reason: str

    @property
    def accepted(self) -> bool:
        return self.decision == "accepted"


def _refused(reason: str) -> Verdict:
    return Verdict("refused", reason[:MAX_REASON_CHARS])


def _listed(items: list[str]) -> str:
    return ", ".join(items) if items else "nobody"


def _rules(policy: ShardPolicy, s: Submission, scope: Scope) -> Iterator[str]:
    """The reasons the rules refuse the submission, in RULES_ORDER."""
    where, who = scope, "data owner" if scope == "shard" else "federation admin"
    if policy.owners is not None and s.owner not in policy.owners:
        yield (f"{where} policy: owner {s.owner!r} may not use this {where} "
               f"(allowed: {_listed(policy.owners)})")
    if not s.user_code and policy.tasks is not None and s.task not in policy.tasks:
        yield (f"{where} policy: task {s.task!r} is not allowed on this {where} "
               f"(allowed: {_listed(policy.tasks)})")
    if s.user_code and not policy.user_code and s.digest not in policy.archives:
        what = "an OpenFL experiment runs its own code" if s.openfl else f"task {s.task}"
        yield (f"{where} policy: user code is not allowed ({what}); the {who} can allow "
               f"it with `userCode: true` or by the archive's digest {s.digest}")
    if s.requirements and not policy.requirements:
        yield (f"{where} policy: requirements.txt is not allowed; the {who} can allow "
               "it with `requirements: true`")
    if policy.max_rounds is not None and s.rounds > policy.max_rounds:
        yield (f"{where} policy: {s.rounds} rounds, more than the {policy.max_rounds} allowed "
               f"(maxRounds)")
    if policy.max_gpus is not None and s.gpus > policy.max_gpus:
        yield (f"{where} policy: {s.gpus} GPUs per collaborator, more than the "
               f"{policy.max_gpus} allowed (maxGpus)")
    for resource, limit, field in (("cpu", policy.max_cpu, "maxCpu"),
                                   ("memory", policy.max_memory, "maxMemory")):
        if limit is None or s.resources is None:
            continue
        for kind, asked in (("request", s.resources.requests), ("limit", s.resources.limits)):
            value = asked.get(resource)
            if value is not None and parse_quantity(value) > parse_quantity(limit):
                yield (f"{where} policy: {resource} {kind} {value} is more than the {limit} "
                       f"allowed ({field})")


def _load_callback(spec: str) -> Callable[..., object]:
    module_name, _, attribute = spec.partition(":")
    target: object = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{spec} is not callable")
    return target


def _run_callback(spec: str, submission: Submission) -> Verdict | None:
    """OpenFL's review_plan_callback(file_name, file_path): a true result accepts."""
    try:
        callback = _load_callback(spec)
    except Exception as exc:  # the data owner's module: any failure refuses
        return _refused(f"review callback {spec} cannot be loaded: "
                        f"{type(exc).__name__}: {exc}")
    with tempfile.TemporaryDirectory(prefix="fedkube-review-") as tmp:
        path = Path(tmp) / submission.plan_name
        path.write_text(submission.plan_text)
        try:
            result = callback(submission.plan_name, str(path))
        except Exception as exc:  # the callback's own refusal, or its bug: refused either way
            return _refused(f"review callback refused the plan: "
                            f"{one_line(str(exc)) or type(exc).__name__}")
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        return _refused(f"review callback {spec} returned an awaitable: it must be a plain "
                        f"function returning a bool")
    return None if result else _refused("review callback refused the plan")


def _first_line(*outputs: bytes) -> str:
    for output in outputs:
        for line in output.decode(errors="replace").splitlines():
            if line.strip():
                return line.strip()
    return ""


def _run_command(argv: list[str], submission: Submission, timeout: float) -> Verdict | None:
    """The command gets the submission as JSON on stdin: exit 0 accepts."""
    payload = json.dumps(submission.as_json()).encode()
    try:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        return _refused(f"review command {argv[0]} cannot start: {exc.strerror or exc}")
    with process:
        try:
            out, err = process.communicate(payload, timeout=timeout)
        except subprocess.TimeoutExpired:
            # Its whole session, so no child of it holds the pipes open.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return _refused(f"review command timed out after {timeout:g} s")
    if process.returncode == 0:
        return None
    line = _first_line(out, err)
    return _refused(f"review command refused the plan: "
                    f"{line or f'it exited with status {process.returncode}'}")


def review(policy: ShardPolicy, submission: Submission, *,
           command_timeout_s: float = REVIEW_TIMEOUT_S, scope: Scope = "shard") -> Verdict:
    """The rules in RULES_ORDER, then the review callback, then the review command: the
    first refusal wins. What passes them all is accepted, or awaits the data owner's
    approval under `approval: manual`."""
    refusal = next(_rules(policy, submission, scope), None)
    if refusal is not None:
        return _refused(refusal)
    if policy.review_callback is not None:
        verdict = _run_callback(policy.review_callback, submission)
        if verdict is not None:
            return verdict
    if policy.review_command is not None:
        verdict = _run_command(policy.review_command, submission, command_timeout_s)
        if verdict is not None:
            return verdict
    if policy.approval == "manual":
        return Verdict("awaiting", "waiting for the data owner's approval")
    return Verdict("accepted", f"the {scope} policy allows it")
