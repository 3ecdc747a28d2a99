"""An Experiment's status from what its director reports: a pure mapping."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedkube.api.experiment import ExperimentState as DirectorState
from fedkube.api.names import with_digest
from fedkube.api.plan import Plan
from fedkube.api.resources import ExperimentSpec
from fedkube.client import ExperimentView
from fedkube.operator.conditions import Conditions, now, set_condition

MAX_EXPERIMENT_NAME = 253  # the director's limit (fedkube.director.core.EXPERIMENT_NAME)


def director_name(namespace: str, name: str) -> str:
    """The experiment's name at the director, unique across namespaces: `<ns>.<name>`,
    cut with a digest of both past the director's 253 characters."""
    full = f"{namespace}.{name}"
    return full if len(full) <= MAX_EXPERIMENT_NAME else with_digest(
        full, MAX_EXPERIMENT_NAME, namespace, name)


def build_plan(spec: ExperimentSpec) -> Plan:
    return Plan(task=spec.task, params=dict(spec.params), rounds=spec.rounds,
                min_collaborators=spec.min_collaborators,
                round_timeout_s=float(spec.round_timeout_seconds), metric=spec.metric,
                higher_is_better=spec.higher_is_better,
                gpus_per_collaborator=spec.gpus_per_collaborator,
                collaborator_resources=spec.collaborator_resources)


@dataclass
class Transition:
    """A status patch and the events the change deserves."""

    status: dict[str, Any]
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    final: bool = False


def _approval(report: ExperimentView, current: dict[str, Any],
              cond: Callable[[str, bool | None, str, str], None],
              events: list[tuple[str, str, str]]) -> None:
    """`Approved` from the shards' review: False with AwaitingApproval naming the shards
    whose data owners have not answered; an event per shard's new decision."""
    if not report.review:
        return
    awaiting = report.awaiting_approval
    refused = {s: r.reason for s, r in report.review.items() if r.decision == "refused"}
    undecided = sorted(set(report.collaborators) - set(report.review))
    if awaiting:
        cond("Approved", False, "AwaitingApproval",
             f"waiting for the data owners of {', '.join(awaiting)}")
    elif undecided and report.status in ("pending", "in_progress"):
        cond("Approved", None, "Reviewing", f"not yet reviewed by {', '.join(undecided)}")
    elif refused and len(refused) == len(report.collaborators):
        cond("Approved", False, "Refused", "; ".join(f"{s}: {r}" for s, r in refused.items()))
    else:
        accepted = sorted(s for s, r in report.review.items() if r.decision == "accepted")
        cond("Approved", True, "Approved", f"accepted by {', '.join(accepted)}"
             + (f"; refused by {', '.join(sorted(refused))}" if refused else ""))
    before = current.get("review") or {}
    for shard, decided in sorted(report.review.items()):
        if (before.get(shard) or {}).get("decision") == decided.decision:
            continue
        if decided.decision == "awaiting":
            events.append(("Normal", "AwaitingApproval",
                           f"{shard}: waiting for its data owner's approval"))
        elif decided.decision == "refused":
            events.append(("Warning", "ShardRefused", f"{shard}: {decided.reason}"))
        else:
            events.append(("Normal", "ShardApproved", f"{shard}: {decided.reason}"))


PHASES = {DirectorState.PENDING: "Queued", DirectorState.IN_PROGRESS: "Running",
          DirectorState.FINISHED: "Succeeded", DirectorState.FAILED: "Failed",
          DirectorState.REJECTED: "Failed"}


def build_status(current: dict[str, Any], report: ExperimentView, generation: int
                 ) -> Transition:
    """Maps the director's report onto status fields, conditions and events."""
    conditions: Conditions = list(current.get("conditions", []))
    state = DirectorState(report.status)
    previous_phase = current.get("phase", "")
    phase = PHASES[state]
    best = report.best_metrics.get(report.metric) if report.metric else None
    last = report.last_metrics.get(report.metric) if report.metric else None
    status: dict[str, Any] = {
        "phase": phase, "round": report.round, "totalRounds": report.total_rounds,
        "progress": f"{report.round}/{report.total_rounds}", "metric": report.metric,
        "bestMetric": best, "lastMetric": last, "queuePosition": report.queue_position,
        "observedGeneration": generation, "droppedCollaborators": report.dropped,
    }
    events: list[tuple[str, str, str]] = []
    newly_dropped = sorted(set(report.dropped) - set(current.get("droppedCollaborators", [])))
    if newly_dropped:
        events.append(("Warning", "CollaboratorDropped",
                       f"round closed on quorum without {', '.join(newly_dropped)}"))

    def cond(type_: str, value: bool | None, reason: str, message: str = "") -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, value, reason, message,
                                   generation=generation)

    _approval(report, current, cond, events)
    status["review"] = {shard: {"decision": r.decision, "reason": r.reason}
                        for shard, r in report.review.items()}

    if state is DirectorState.PENDING:
        message = f"waiting for busy shards (queue position {report.queue_position})"
        cond("Running", False, "Queued", message)
        cond("Ready", False, "Queued", message)
    elif state is DirectorState.IN_PROGRESS:
        message = f"round {report.round} of {report.total_rounds}"
        cond("Running", True, "RoundInProgress", message)
        cond("Ready", False, "Running", message)
        if not current.get("startTime"):
            status["startTime"] = now()
        if previous_phase != phase:
            events.append(("Normal", "Started", "the director started the experiment"))
        elif report.round != current.get("round"):
            events.append(("Normal", "RoundCompleted",
                           f"round {report.round} of {report.total_rounds}: "
                           f"{report.metric} {last}"))
    elif state is DirectorState.FINISHED:
        message = f"{report.total_rounds} rounds; best {report.metric} {best}"
        cond("Running", False, "Completed", message)
        cond("Succeeded", True, "Completed", message)
        cond("Ready", True, "Succeeded", message)
        status["completionTime"] = current.get("completionTime") or now()
        status["modelLocation"] = "director: fedkube experiment model " + report.name
        if previous_phase != phase:
            events.append(("Normal", "Succeeded", message))
    else:
        reason = "Rejected" if state is DirectorState.REJECTED else "CollaboratorFailed"
        message = report.error or f"the director reports {state.value}"
        cond("Running", False, reason, message)
        cond("Failed", True, reason, message)
        cond("Ready", False, "Failed", message)
        status["error"] = message
        status["completionTime"] = current.get("completionTime") or now()
        if previous_phase != phase:
            events.append(("Warning", reason, message))
    status["conditions"] = conditions
    return Transition(status=status, events=events, final=state.is_final)
