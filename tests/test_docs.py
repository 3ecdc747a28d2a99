"""The documentation's commands, run as written (free ports swapped in), so the docs
cannot drift from the code."""

from __future__ import annotations

import json
import os
import re
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
