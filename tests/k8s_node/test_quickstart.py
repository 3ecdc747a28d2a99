"""The quick start's Kubernetes section on a real node: `helm install` with the locally
built image, a Federation under mTLS, its envoy's certificate requested from a real Pod,
an Experiment to `kubectl wait --for=condition=Succeeded`."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from fedkube.dev.node import RealNode
from fedkube.dev.processes import wait_for
from tests.helpers import QUICKSTART, ROOT, bash_blocks, run_script

pytestmark = [pytest.mark.k8s, pytest.mark.k8s_node]
DIRECTOR_DATA = "digits-director-data"


def _one_node(lines: list[str]) -> list[str]:
    """deploy/shard.yaml has two shards on two GPU nodes, this machine one: the second
    shard and its place in the experiment go."""
    shard = yaml.safe_load_all((ROOT / "deploy/shard.yaml").read_text())
    first = next(iter(shard))
    experiment = yaml.safe_load((ROOT / "deploy/experiment.yaml").read_text())
    experiment["spec"] |= {"shards": [first["metadata"]["name"]], "minCollaborators": 1}
    return [line.replace("-f deploy/shard.yaml -f deploy/experiment.yaml", "-f -")
            .replace("apply -f deploy/federation.yaml -f -",
                     f"apply -f deploy/federation.yaml -f - <<'EOF'\n"
                     f"{yaml.safe_dump_all([first, experiment])}EOF")
            for line in lines]


def test_quickstart_runs_as_written_on_a_real_node(real_node: RealNode) -> None:
    plane = real_node.plane
    plane.apply([real_node.local_volume("fl", DIRECTOR_DATA)])
    # `make image`: done by the fixture, which also loaded the image into the node.
    lines = _one_node([line for line in bash_blocks(QUICKSTART, "3.") if line != "make image"])
    assert any("kubectl -n fl wait --for=condition=Succeeded" in line for line in lines)
    env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig),
           "PATH": f"{plane.bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = run_script(lines, ROOT, env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "condition met" in result.stdout

    # The experiment succeeds with its last round; its collaborator Pod ends just after.
    wait_for(lambda: plane.kubectl("-n", "fl", "get", "pods", "-o", "name", check=False)
             .stdout.count("collab") == 0, timeout=60, message="the collaborator Pod removed")

    def logs(selector: str) -> str:
        return plane.kubectl("-n", "fl", "logs", "-l", selector, "--tail=-1").stdout

    director = logs("app.kubernetes.io/component=director")
    assert "round" in director, director[-2000:]
    envoy = logs("app.kubernetes.io/component=envoy")
    assert "digits-logreg" in envoy, envoy[-2000:]
    # The collaborator Pod is gone, and its rounds are in its envoy's log.
    assert re.search(r"collaborator \S+: .*round \d+: \S+ done", envoy), envoy[-3000:]
    # The director became Ready through its gRPC health probe (on the plaintext port).
    pod = json.loads(plane.kubectl("-n", "fl", "get", "pods", "-l",
                                   "app.kubernetes.io/component=director", "-o",
                                   "json").stdout)["items"][0]
    probe = pod["spec"]["containers"][0]["readinessProbe"]
    assert "grpc" in probe, probe
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert ready["Ready"] == "True", pod["status"]
    # The envoy Pod asked for its shard's certificate, and the operator signed it.
    csrs = json.loads(plane.kubectl("get", "csr", "-l", "fedkube.io/shard=hospital-a", "-o",
                                    "json").stdout)["items"]
    assert any(c["spec"]["username"].startswith("system:serviceaccount:fl:")
               and c["status"].get("certificate") for c in csrs), csrs
    shard = json.loads(plane.kubectl("-n", "fl", "get", "shard", "hospital-a", "-o",
                                     "json").stdout)
    online = {c["type"]: c["status"] for c in shard["status"]["conditions"]}
    assert online.get("Online") == "True", shard["status"]
