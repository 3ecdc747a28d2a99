"""The Kubernetes section of the quick start, run on the test control plane."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fedkube.dev.cluster import ControlPlane
from tests.helpers import QUICKSTART, ROOT, bash_blocks, run_script

pytestmark = pytest.mark.k8s


def test_quickstart_helm_section_runs_on_the_test_cluster(cluster: ControlPlane) -> None:
    # Not `make image` (tests/k8s_node builds and loads it), nor the wait: KWOK nodes run
    # no containers, so no experiment succeeds here (tests/k8s_node waits for it).
    lines = [line for line in bash_blocks(QUICKSTART, "3.")
             if line != "make image" and " wait --for" not in line]
    lines = [line.replace(" --wait", "") for line in lines]
    # Own release and namespaces, so the chart's own tests in this session are untouched.
    lines = [line.replace("helm install fl ", "helm install docs ")
             .replace("fedkube-system", "docs-system").replace("-n fl ", "-n docs-fl ")
             .replace("namespace fl", "namespace docs-fl") for line in lines]
    tools = cluster.bin_dir
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig),
           "PATH": f"{tools}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = run_script(lines, ROOT, env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "federation.fedkube.io/digits" in result.stdout
    assert "experiment.fedkube.io/digits-logreg" in result.stdout
