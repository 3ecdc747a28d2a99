"""A Federation's conditions from its director's Deployment and Pods and from whether the
director answers: pure functions.

DirectorAvailable follows the Deployment's Available condition and, while it is not,
says why from its Pods (the scheduler's reason, a container's waiting reason). Ready is
True only once the director answers a call at status.directorEndpoint; with the default
endpoint (the director's Service) a director whose Deployment is not available is not
asked, and Ready carries DirectorAvailable's reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedkube.operator.conditions import Conditions, get_condition, set_condition


@dataclass(frozen=True)
class Verdict:
    status: bool | None  # None: Unknown
    reason: str
    message: str = ""


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == type_), {})


def _pod_problem(pod: dict[str, Any]) -> Verdict | None:
    """Why one of the director's Pods does not serve, if it says."""
    scheduled = _condition(pod, "PodScheduled")
    if scheduled.get("status") == "False":
        return Verdict(False, scheduled.get("reason") or "Unschedulable",
                       scheduled.get("message", ""))
    status = pod.get("status") or {}
    for container in [*(status.get("initContainerStatuses") or []),
                      *(status.get("containerStatuses") or [])]:
        state = container.get("state") or {}
        waiting = state.get("waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating",
                                                     "PodInitializing"):
            return Verdict(False, str(waiting["reason"]), str(waiting.get("message", "")))
        terminated = state.get("terminated")
        if terminated:
            return Verdict(False, str(terminated.get("reason") or "Terminated"),
                           str(terminated.get("message", "")))
    if status.get("phase") == "Pending":
        return Verdict(False, "PodPending", f"pod {pod['metadata']['name']} is Pending")
    ready = _condition(pod, "Ready")
    if ready.get("status") != "True":
        return Verdict(False, "DirectorNotReady",
                       f"pod {pod['metadata']['name']} is not ready (its health check)")
    return None


def director_availability(deployment: dict[str, Any] | None, pods: list[dict[str, Any]]
                          ) -> Verdict:
    """DirectorAvailable from the director's Deployment and its Pods."""
    if deployment is None:
        return Verdict(None, "DeploymentMissing", "the director's Deployment is not there yet")
    available = _condition(deployment, "Available")
    if available.get("status") == "True":
        return Verdict(True, "MinimumReplicasAvailable",
                       available.get("message") or "the director's Deployment is available")
    for pod in sorted(pods, key=lambda p: str(p["metadata"].get("creationTimestamp", "")),
                      reverse=True):
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        problem = _pod_problem(pod)
        if problem is not None:
            return problem
    # No pod says why: the Deployment may (a quota, an admission refusal, a deadline).
    for type_ in ("ReplicaFailure", "Progressing"):
        condition = _condition(deployment, type_)
        failed = (condition.get("status") == "True" if type_ == "ReplicaFailure"
                  else condition.get("status") == "False")
        if failed:
            return Verdict(False, condition.get("reason") or type_,
                           condition.get("message", ""))
    return Verdict(False, available.get("reason") or "DeploymentUnavailable",
                   available.get("message") or "the director's Deployment is not available")


def federation_conditions(current: Conditions, available: Verdict, answer: Verdict | None,
                          *, generation: int) -> Conditions:
    """DirectorAvailable and Ready. answer: whether the director answered a call (None:
    not asked, as its Service has no serving Pod behind it)."""
    conditions = set_condition(current, "DirectorAvailable", available.status,
                               available.reason, available.message, generation=generation)
    ready = answer if answer is not None else Verdict(
        False if available.status is not None else None, available.reason,
        available.message)
    return set_condition(conditions, "Ready", ready.status, ready.reason, ready.message,
                         generation=generation)


def ready_changed(before: Conditions, after: Conditions) -> dict[str, Any] | None:
    """The Ready condition of `after` where its status or reason differs from `before`."""
    old, new = get_condition(before, "Ready"), get_condition(after, "Ready")
    if new is None:
        return None
    if old is not None and (old.get("status"), old.get("reason")) == (
            new.get("status"), new.get("reason")):
        return None
    return new
