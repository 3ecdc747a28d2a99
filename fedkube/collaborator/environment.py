"""A Python environment per experiment: when its plan sets `install_requirements`, the
archive's requirements.txt is installed into a virtualenv of the experiment's own, layered
over the environment fedkube runs in (so fedkube and its dependencies stay importable and
the experiment's packages take precedence), and the collaborator runs inside it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from fedkube.api.errors import FedkubeError
from fedkube.api.plan import REQUIREMENTS_FILE
from fedkube.startup import exec_fedkube

log = logging.getLogger(__name__)

ACTIVE_VENV_ENV = "FEDKUBE_EXPERIMENT_VENV"
INSTALL_TIMEOUT_S = 1800


class RequirementsError(FedkubeError, RuntimeError):
    """Installing an experiment's requirements failed; the message says why."""


def _venv_python(venv_dir: Path) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _site_packages(venv_dir: Path) -> Path:
    python = _venv_python(venv_dir)
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                          "'purelib'))"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def install_requirements(workspace: Path, venv_dir: Path) -> Path:
    """Creates venv_dir with workspace/requirements.txt installed; returns its python.

    pip runs in the workspace, so requirement lines may name files of the archive
    (`./wheels/pkg-1.0-py3-none-any.whl`)."""
    requirements = workspace / REQUIREMENTS_FILE
    if not requirements.is_file():
        raise RequirementsError(f"install_requirements is set but the archive has no "
                                f"{REQUIREMENTS_FILE}")
    venv.EnvBuilder(with_pip=False, clear=True, symlinks=os.name != "nt").create(venv_dir)
    # Our own site-packages after the experiment's: fedkube stays importable, theirs win.
    parents = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (_site_packages(venv_dir) / "_fedkube_parent.pth").write_text(
        "".join(f"{path}\n" for path in parents))
    python = _venv_python(venv_dir)
    log.info("installing %s into %s", REQUIREMENTS_FILE, venv_dir)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(python), "install",
             "--disable-pip-version-check", "--no-input", "-r", REQUIREMENTS_FILE],
            cwd=workspace, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RequirementsError(f"pip install took longer than {INSTALL_TIMEOUT_S} s") from None
    sys.stderr.write(result.stdout[-5000:])
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "ERROR" in line),
                      lines[-1] if lines else f"exit {result.returncode}")
        raise RequirementsError(f"installing {REQUIREMENTS_FILE} failed: {reason.strip()}")
    return python


def reexec_in(python: Path, venv_dir: Path, argv: list[str]) -> None:
    """Replaces this process with the collaborator running in the experiment's venv."""
    exec_fedkube(python, argv, {**os.environ, ACTIVE_VENV_ENV: str(venv_dir.resolve())})


def in_venv(venv_dir: Path) -> bool:
    return os.environ.get(ACTIVE_VENV_ENV) == str(venv_dir.resolve())
