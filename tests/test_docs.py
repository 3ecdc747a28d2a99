"""The documentation's commands, run as written (free ports swapped in), so the docs
cannot drift from the code."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedkube.dev.processes import free_port
from tests.helpers import QUICKSTART, ROOT, bash_blocks, run_script


@pytest.mark.slow
def test_quickstart_local_sections_run_as_written(tmp_path: Path) -> None:
    lines = bash_blocks(QUICKSTART, "1.") + bash_blocks(QUICKSTART, "2.")
    assert any(line.startswith("fedkube director start") for line in lines)
    grpc_port, metrics_port = str(free_port()), str(free_port())
    lines = [line.replace("50051", grpc_port).replace("9090", metrics_port)
             for line in lines]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = run_script(lines, tmp_path, env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    # What the page promises, checked.
    assert (tmp_path / "demo-output" / "metrics.png").stat().st_size > 20_000
    status = [json.loads(line) for line in result.stdout.splitlines()
              if line.startswith("{") and '"status"' in line]
    assert status and all(s["status"] == "finished" and s["round"] == 5 for s in status)
    assert (tmp_path / "digits-1.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "best.npz").exists()
    assert re.search(r"^fedkube_round_duration_seconds_count 5\.0$", result.stdout, re.M)
    assert (tmp_path / "data" / "director.sqlite3").exists()


def test_concepts_yaml_is_valid_and_its_reasons_exist() -> None:
    import yaml

    from fedkube.api.resources import KINDS

    text = (ROOT / "docs" / "concepts.md").read_text()
    models = {kind.kind: kind.spec for kind in KINDS}
    documents = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    assert sorted(d["kind"] for d in documents) == ["Experiment", "Federation", "Shard"]
    for document in documents:
        models[document["kind"]].model_validate(document["spec"])  # extra fields refused
    # Every condition reason and event the lifecycle table names is one the operator uses.
    source = "".join(path.read_text() for path in (ROOT / "fedkube" / "operator").glob("*.py"))
    table = text[text.index("### Lifecycle"):]
    for reason in re.findall(r"`([A-Z][A-Za-z]+)`", table):
        assert f'"{reason}"' in source, reason


@pytest.mark.k8s
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_dev_cluster_section_runs_as_written(tmp_path: Path) -> None:
    """Section 4 as written: `fedkube dev cluster up` in the background, its kubectl and
    helm on PATH from the `eval`, the operator, director and envoys as local processes, an
    Experiment to Succeeded, `down`. Its own cluster (not the k8s tests' session one), in
    a directory holding the repository's crds/ and deploy/."""
    lines = bash_blocks(QUICKSTART, "4.")
    assert lines[0] == 'eval "$(fedkube dev cluster up)"'
    assert any(line.startswith("fedkube operator run") for line in lines)
    assert lines[-1] == "fedkube dev cluster down"
    port = str(free_port())
    lines = [line.replace("50052", port) for line in lines]
    lines.insert(1, "helm version --short; command -v kubectl")  # what the eval put on PATH
    for name in ("crds", "deploy"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {key: value for key, value in os.environ.items() if key != "KUBECONFIG"}
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    work = tmp_path / ".fedkube-cluster"
    try:
        result = run_script(lines, tmp_path, env, timeout=780)
    finally:
        stray = _processes_under(work)
        subprocess.run([sys.executable, "-m", "fedkube.cli", "dev", "cluster", "down",
                        "--dir", str(work)], env=env, capture_output=True, timeout=60)
    logs = "".join(f"----- {log.name} -----\n{log.read_text(errors='replace')[-2000:]}\n"
                   for log in sorted(tmp_path.glob("*.log")))
    assert result.returncode == 0, (result.stdout[-3000:] + result.stderr[-3000:] + logs)
    assert not stray, f"`fedkube dev cluster down` left {stray}"
    assert f"{work / 'bin'}/kubectl" in result.stdout  # the eval's PATH
    assert re.search(r"^v3\.\d+", result.stdout, re.M)  # helm, from that PATH
    assert result.stdout.count("condition met") >= 3  # the CRDs, the shards, the experiment
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if line.split() and "/" in line.split()[0]}
    assert rows["federation.fedkube.io/digits"][1:3] == ["True", "DirectorAnswering"], rows
    assert rows["experiment.fedkube.io/digits-logreg"][1:5] == [
        "True", "Succeeded", "Succeeded", "5/5"], rows
    for shard, node in (("hospital-a", "gpu-node-1"), ("hospital-b", "gpu-node-2")):
        row = rows[f"shard.fedkube.io/{shard}"]
        assert row[1:4] == ["True", "Online", "true"] and row[5] == node, rows
    assert not (work / "state.json").exists()


def _processes_under(work: Path) -> list[str]:
    """The commands of running processes whose command line names work."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and str(work) in command:
            found.append(command[:120])
    return found


def test_dev_cluster_commands_without_a_cluster(tmp_path: Path) -> None:
    """status and env say that none runs (exit 1, one line); down has nothing to stop."""
    def fedkube(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fedkube.cli", "dev", "cluster", *args,
                               "--dir", str(tmp_path / "none")], capture_output=True,
                              text=True, timeout=60)

    for action in ("status", "env"):
        result = fedkube(action)
        assert result.returncode == 1, result
        assert result.stderr == (f"fedkube: no dev cluster runs in {tmp_path / 'none'}; "
                                 f"`fedkube dev cluster up --dir {tmp_path / 'none'}` "
                                 "starts one\n")
        assert result.stdout == ""
    result = fedkube("down")
    assert result.returncode == 0 and "no dev cluster runs" in result.stderr


def test_make_help_is_the_default_and_describes_every_target() -> None:
    makefile = (ROOT / "Makefile").read_text()
    phony = {name for line in re.findall(r"^\.PHONY:(.*)$", makefile, re.M)
             for name in line.split()}
    assert {"help", "install", "test", "demo", "dev-cluster"} <= phony
    result = subprocess.run(["make", "--no-print-directory"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    described = {line.split()[0]: line for line in result.stdout.splitlines()
                 if line.startswith("  ") and len(line.split()) > 1}
    assert phony <= set(described), result.stdout
    assert next(iter(described)) == "help" and max(map(len, described.values())) <= 100
