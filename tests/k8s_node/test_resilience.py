"""What only a real node shows: a director Pod deleted mid-experiment stops on SIGTERM
and its successor resumes the experiment from the volume; a collaborator over its memory
limit is OOMKilled and its Experiment says so."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml

from fedkube.dev.node import RealNode
from fedkube.dev.processes import wait_for
from tests.helpers import ROOT

pytestmark = [pytest.mark.k8s, pytest.mark.k8s_node]
NAMESPACE = "fl"
CHART = ROOT / "charts" / "fedkube"
GRACE_S = 30  # a Pod's default terminationGracePeriodSeconds


def _experiment(name: str, **spec: Any) -> dict[str, Any]:
    experiment = yaml.safe_load((ROOT / "deploy/experiment.yaml").read_text())
    experiment["metadata"]["name"] = name
    experiment["spec"] |= {"shards": ["hospital-a"], "minCollaborators": 1, **spec}
    return dict(experiment)


@pytest.fixture
def federation(real_node: RealNode) -> RealNode:
    """The quick start's operator and Federation, with its one shard Online (made here
    when the quick start's test has not run first)."""
    plane = real_node.plane
    if plane.helm("status", "fl", "-n", "fedkube-system", check=False).returncode != 0:
        plane.helm("install", "fl", str(CHART), "--namespace", "fedkube-system",
                   "--create-namespace", "--wait")
    if plane.kubectl("get", "namespace", NAMESPACE, check=False).returncode != 0:
        plane.kubectl("create", "namespace", NAMESPACE)
        plane.kubectl("label", "namespace", NAMESPACE,
                      "pod-security.kubernetes.io/enforce=restricted")
        plane.apply([real_node.local_volume(NAMESPACE, "digits-director-data")])
    shard = next(iter(yaml.safe_load_all((ROOT / "deploy/shard.yaml").read_text())))
    plane.kubectl("-n", NAMESPACE, "apply", "-f", str(ROOT / "deploy/federation.yaml"))
    plane.kubectl("-n", NAMESPACE, "apply", "-f", "-", input=yaml.safe_dump(shard))
    plane.kubectl("-n", NAMESPACE, "wait", "--for=condition=Online", "shard/hospital-a",
                  "--timeout=300s")
    return real_node


def _status(node: RealNode, name: str) -> dict[str, Any]:
    out = node.plane.kubectl("-n", NAMESPACE, "get", "experiment", name, "-o", "json",
                             check=False).stdout
    return dict(json.loads(out).get("status", {})) if out else {}


def _director_pod(node: RealNode) -> str:
    return node.plane.kubectl("-n", NAMESPACE, "get", "pods", "-l",
                              "app.kubernetes.io/component=director", "-o",
                              "jsonpath={.items[0].metadata.name}").stdout


def test_a_deleted_director_pod_stops_at_once_and_its_successor_resumes(
        federation: RealNode) -> None:
    plane = federation.plane
    name = "resumed"
    plane.kubectl("-n", NAMESPACE, "apply", "-f", "-", input=yaml.safe_dump(_experiment(
        name, rounds=30, roundTimeoutSeconds=120)))
    wait_for(lambda: _status(federation, name).get("round", 0) >= 2, timeout=300,
             interval=1, message="two rounds done")
    first = _director_pod(federation)
    started = time.monotonic()
    plane.kubectl("-n", NAMESPACE, "delete", "pod", first, "--wait=true", "--timeout=60s")
    took = time.monotonic() - started
    assert took < GRACE_S / 2, f"the director took {took:.1f} s to stop (SIGTERM ignored?)"
    wait_for(lambda: _director_pod(federation) not in ("", first), timeout=120,
             interval=1, message="a new director Pod")
    result = plane.kubectl("-n", NAMESPACE, "wait", "--for=condition=Succeeded",
                           f"experiment/{name}", "--timeout=600s", check=False)
    assert result.returncode == 0, (result.stderr, _status(federation, name))
    assert _status(federation, name).get("round") == 30
    print(f"director Pod deleted in {took:.1f} s; experiment resumed and succeeded")


def test_a_collaborator_over_its_memory_limit_is_oomkilled_and_the_experiment_fails(
        federation: RealNode) -> None:
    plane = federation.plane
    name = "oom"
    plane.kubectl("-n", NAMESPACE, "apply", "-f", "-", input=yaml.safe_dump(_experiment(
        name, rounds=2, collaboratorResources={"limits": {"memory": "48Mi"},
                                               "requests": {"memory": "48Mi"}})))
    result = plane.kubectl("-n", NAMESPACE, "wait", "--for=condition=Failed",
                           f"experiment/{name}", "--timeout=300s", check=False)
    status = _status(federation, name)
    assert result.returncode == 0, (result.stderr, status)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert "OOMKilled" in failed["message"], failed
