"""The import contracts of .importlinter hold, and they would catch a wrong import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports over the fedkube package found in tree, with the repository's contracts."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / ".importlinter"),
                           "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "fedkube", tmp_path / "fedkube",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_layers_hold() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "wrong_import", "contract"), [
    ("envoy_agent/agent.py", "import fedkube.director.core", "Roles above transport"),
    ("director/core.py", "import fedkube.dev.processes", "Roles above transport"),
    ("transport/channel.py", "import fedkube.client", "Roles above transport"),
    ("api/plan.py", "import grpc", "import no gRPC"),
])
def test_a_wrong_import_breaks_a_contract(tmp_path: Path, module: str, wrong_import: str,
                                          contract: str) -> None:
    tree = _copy(tmp_path)
    path = tree / "fedkube" / module
    path.write_text(path.read_text() + f"\n{wrong_import}  # noqa\n")
    result = _lint(tree)
    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(contract in line for line in broken), result.stdout
