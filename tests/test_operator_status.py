"""Kubernetes status that tells the truth, without a cluster: a Federation's conditions
from its director's Deployment and answers, printer columns, field descriptions, events
and log lines that repeat only on change."""

from __future__ import annotations

import io
import logging
from typing import Any

import grpc
import pytest

from fedkube.api.crds import build_crd
from fedkube.api.resources import EXPERIMENT, FEDERATION, KINDS, SHARD
from fedkube.operator.conditions import get_condition
from fedkube.operator.events import QuietKopf, Recent, rpc_error
from fedkube.operator.federations import (
    Verdict,
    director_availability,
    federation_conditions,
    ready_changed,
)

UNBOUND = ("0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims. "
           "preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling.")


def _deployment(available: str, reason: str = "MinimumReplicasUnavailable") -> dict[str, Any]:
    return {"metadata": {"name": "digits-director"}, "status": {"conditions": [
        {"type": "Available", "status": available, "reason": reason,
         "message": "Deployment does not have minimum availability."},
        {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]}}


def _pod(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "digits-director-abc",
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Pending", **status}}


def test_an_unschedulable_director_is_not_available_and_says_the_schedulers_reason() -> None:
    pending = _pod(conditions=[{"type": "PodScheduled", "status": "False",
                                "reason": "Unschedulable", "message": UNBOUND}])
    verdict = director_availability(_deployment("False"), [pending])
    assert verdict == Verdict(False, "Unschedulable", UNBOUND)
    conditions = federation_conditions([], verdict, None, generation=3)
    ready = get_condition(conditions, "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False",
                                                                       "Unschedulable")
    assert "unbound immediate PersistentVolumeClaims" in ready["message"]
    assert get_condition(conditions, "DirectorAvailable")["status"] == "False"  # type: ignore[index]


def test_director_availability_from_containers_and_the_deployment() -> None:
    pulling = _pod(conditions=[{"type": "PodScheduled", "status": "True"}],
                   containerStatuses=[{"name": "director", "state": {"waiting": {
                       "reason": "ImagePullBackOff", "message": "no such image"}}}])
    assert director_availability(_deployment("False"), [pulling]) == Verdict(
        False, "ImagePullBackOff", "no such image")
    assert director_availability(_deployment("True", "MinimumReplicasAvailable"),
                                 []).status is True
    assert director_availability(None, []).status is None
    refused = _deployment("False")
    refused["status"]["conditions"].append({"type": "ReplicaFailure", "status": "True",
                                            "reason": "FailedCreate",
                                            "message": "pods forbidden: quota"})
    assert director_availability(refused, []) == Verdict(False, "FailedCreate",
                                                         "pods forbidden: quota")


def test_ready_follows_the_directors_answer_not_the_manifests_applied() -> None:
    available = Verdict(True, "MinimumReplicasAvailable", "")
    unreachable = Verdict(False, "DirectorUnreachable", "UNAVAILABLE: connection refused")
    down = federation_conditions([], available, unreachable, generation=1)
    assert get_condition(down, "Ready")["reason"] == "DirectorUnreachable"  # type: ignore[index]
    up = federation_conditions(down, available, Verdict(True, "DirectorAnswering", "2 shards"),
                               generation=1)
    assert get_condition(up, "Ready")["status"] == "True"  # type: ignore[index]
    assert ready_changed(down, up) is not None
    # The same status and reason again is no change (no second event).
    again = federation_conditions(up, available, Verdict(True, "DirectorAnswering", "3"),
                                  generation=1)
    assert ready_changed(up, again) is None


def test_printer_columns_carry_the_reason_and_the_shards_node_from_its_spec() -> None:
    def columns(kind: Any) -> dict[str, str]:
        version = build_crd(kind)["spec"]["versions"][0]
        return {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}

    for kind in (FEDERATION, SHARD, EXPERIMENT):
        assert columns(kind)["Reason"] == '.status.conditions[?(@.type=="Ready")].reason'
    assert columns(SHARD)["Node"] == ".spec.nodeName"


def test_every_field_of_every_crd_has_a_description() -> None:
    missing = []

    def walk(node: dict[str, Any], path: str) -> None:
        if path and "description" not in node:
            missing.append(path)
        for name, prop in node.get("properties", {}).items():
            walk(prop, f"{path}.{name}")
        if isinstance(node.get("items"), dict) and "properties" in node["items"]:
            walk(node["items"], f"{path}[]")

    for kind in KINDS:
        schema = build_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for part in ("spec", "status"):
            walk(schema["properties"][part], f"{kind.kind}.{part}")
    assert missing == []


def test_the_same_event_again_is_not_posted_until_the_window_passes() -> None:
    recent = Recent(window_s=600)
    reason = ("Warning", "FederationNotFound", "Federation 'nowhere' does not exist")
    assert recent.fresh("uid-1", reason, now=0)
    assert not recent.fresh("uid-1", reason, now=5)
    assert recent.fresh("uid-2", reason, now=5)  # another object
    assert recent.fresh("uid-1", ("Warning", "DirectorUnreachable", "x"), now=6)
    assert recent.fresh("uid-1", reason, now=7)  # changed back: news again
    assert not recent.fresh("uid-1", reason, now=606)
    assert recent.fresh("uid-1", reason, now=608)
    bounded = Recent(capacity=2)
    for key in "abc":
        bounded.fresh(key, 1)
    assert bounded.fresh("a", 1)  # the oldest was dropped


class _Rpc(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "failed to connect to all addresses;\n last error: Connection refused"

    def __str__(self) -> str:
        return "<_InactiveRpcError of RPC that terminated with:\n\tstatus = ...\n>"


def test_grpc_errors_are_logged_on_one_line() -> None:
    assert rpc_error(_Rpc()) == ("UNAVAILABLE: failed to connect to all addresses; "
                                 "last error: Connection refused")


@pytest.mark.parametrize(("level", "message", "shown"), [
    (logging.INFO, "Timer 'follow_experiments' succeeded.", None),
    (logging.ERROR, "Handler 'submit_experiment' failed temporarily: no shard online",
     "INFO"),
    (logging.ERROR, "Handler 'submit_experiment' failed permanently: refused", "ERROR"),
    (logging.ERROR, "Handler 'x' failed temporarily but will exceed 3 retries: y", "ERROR"),
    (logging.INFO, "Handler 'reconcile_federation' succeeded.", "INFO"),
])
def test_kopfs_per_call_lines_are_quieted(level: int, message: str, shown: str | None
                                          ) -> None:
    logger = logging.getLogger(f"test.kopf.objects.{level}.{len(message)}")
    logger.propagate = False
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.addFilter(QuietKopf())
    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.INFO)
    try:
        logger.log(level, message)
    finally:
        root.setLevel(saved)
    assert stream.getvalue() == ("" if shown is None else f"{shown} {message}\n")


class _Director:
    def __init__(self) -> None:
        self.removed: list[str] = []

    def remove(self, name: str) -> None:
        self.removed.append(name)
        raise _Rpc()


class _Directors:
    def __init__(self, director: _Director) -> None:
        self.director = director

    def get(self, namespace: str, federation: str, index: object) -> _Director:
        return self.director


def _deleting(monkeypatch: pytest.MonkeyPatch, accepted: bool, runtime_s: float
              ) -> tuple[_Director, list[dict[str, Any]]]:
    import datetime as dt

    import kopf

    from fedkube.operator import handlers
    from fedkube.operator.conditions import set_condition

    director, posted = _Director(), []
    state = type("State", (), {"recent": Recent(), "directors": _Directors(director)})()
    monkeypatch.setattr(handlers, "state_of", lambda memo: state)
    monkeypatch.setattr(kopf, "event", lambda obj, **event: posted.append(event))
    conditions = set_condition([], "Accepted", accepted,
                               "Submitted" if accepted else "DirectorUnreachable")
    remove: Any = handlers.remove_experiment  # called as kopf would, with what it reads
    remove(name="exp", namespace="team", spec={"federation": "fed"},
           status={"conditions": conditions}, body={"metadata": {"uid": "u"}}, memo=None,
           runtime=dt.timedelta(seconds=runtime_s), federations=None)
    return director, posted


def test_deleting_an_experiment_no_director_accepted_asks_no_director(
        monkeypatch: pytest.MonkeyPatch) -> None:
    director, posted = _deleting(monkeypatch, accepted=False, runtime_s=0)
    assert director.removed == [] and posted == []


def test_deleting_an_accepted_experiment_retries_then_lets_go_with_a_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import kopf

    with pytest.raises(kopf.TemporaryError, match="UNAVAILABLE: failed to connect"):
        _deleting(monkeypatch, accepted=True, runtime_s=10)
    director, posted = _deleting(monkeypatch, accepted=True, runtime_s=61)
    assert director.removed == ["team.exp"]
    assert [(e["type"], e["reason"]) for e in posted] == [("Warning", "DirectorDataKept")]
    assert "fedkube experiment remove team.exp" in posted[0]["message"]
