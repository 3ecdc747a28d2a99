"""A Python environment per experiment: when its plan sets `install_requirements`, the
archive's requirements.txt is installed into a virtualenv of the experiment's own, layered
over the environment fedkube runs in (so fedkube and its dependencies stay importable and
the experiment's packages take precedence), and the collaborator runs inside it.

Only where the envoy's sandbox policy allows it (REQUIREMENTS_POLICY_ENV, set by the
process runtime): and then binary wheels only (`--only-binary :all:`, no requirement
naming a source tree, an sdist or a VCS checkout), so that nothing of the archive runs at
install time, no pip option from the file (but `--hash`), and `--require-hashes` where the
policy asks for it."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Mapping
from pathlib import Path

from fedkube.api.config import REQUIREMENTS_POLICY_ENV
from fedkube.api.errors import FedkubeError
from fedkube.api.plan import REQUIREMENTS_FILE
from fedkube.startup import exec_fedkube

log = logging.getLogger(__name__)

ACTIVE_VENV_ENV = "FEDKUBE_EXPERIMENT_VENV"
INSTALL_TIMEOUT_S = 1800


class RequirementsError(FedkubeError, RuntimeError):
    """Installing an experiment's requirements failed; the message says why."""


POLICIES = ("refuse", "binary", "hashes")
# What pip takes for a file to install rather than a project name (a bare `pkg.tar.gz`).
ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz",
                    ".txz", ".tar.lz", ".tlz")


def requirements_policy(environ: Mapping[str, str] | None = None) -> str:
    """What the envoy's sandbox allows: "refuse", "binary" (wheels only) or "hashes" (wheels
    pinned by hash). Unset (a collaborator Pod, a run by hand): "binary"."""
    value = (os.environ if environ is None else environ).get(REQUIREMENTS_POLICY_ENV, "binary")
    if value not in POLICIES:
        raise RequirementsError(f"{REQUIREMENTS_POLICY_ENV}={value!r}: not one of {POLICIES}")
    return value


def _logical_lines(text: str) -> list[str]:
    """requirements.txt as pip reads it: continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        current += raw
        if current.endswith("\\"):
            current = current[:-1]
            continue
        line = re.sub(r"(^|\s)#.*$", "", current).strip()
        current = ""
        if line:
            lines.append(line)
    if current.strip():
        lines.append(current.strip())
    return lines


def _is_wheel(location: str) -> bool:
    path = location.split("#", 1)[0].split("?", 1)[0].strip()
    return path.endswith(".whl")


def check_requirements(text: str) -> None:
    """Refuses (RequirementsError) what would let the archive run code or steer pip at
    install time: option lines (`-e`, `-r`, `--index-url`, `--no-binary`, ...), options
    after a requirement other than `--hash`, and requirements that are not a name but a
    directory, an sdist, a VCS checkout or any file or URL other than a wheel."""
    for line in _logical_lines(text):
        tokens = line.split()
        first_option = next((i for i, token in enumerate(tokens) if token.startswith("-")),
                            len(tokens))
        if first_option == 0:
            raise RequirementsError(f"{REQUIREMENTS_FILE}: pip options are not accepted: "
                                    f"{line!r}")
        options = tokens[first_option:]
        i = 0
        while i < len(options):
            option = options[i]
            if option.startswith("--hash="):
                i += 1
            elif option == "--hash" and i + 1 < len(options):
                i += 2
            else:
                raise RequirementsError(f"{REQUIREMENTS_FILE}: only --hash may follow a "
                                        f"requirement: {line!r}")
        requirement = " ".join(tokens[:first_option]).split(";", 1)[0].strip()
        location = requirement.split(" @ ", 1)[1] if " @ " in requirement else requirement
        named = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^]]*\])?\s*([<>=!~]=?.*)?$",
                         location.strip())
        if (named and " @ " not in requirement
                and not named.group(1).lower().endswith(ARCHIVE_SUFFIXES)):
            continue  # a name (and version): from the index, as a wheel (--only-binary)
        if location.strip().lower().startswith(("git+", "hg+", "svn+", "bzr+")):
            raise RequirementsError(f"{REQUIREMENTS_FILE}: VCS requirements would be built "
                                    f"from source: {line!r}")
        if not _is_wheel(location):
            raise RequirementsError(f"{REQUIREMENTS_FILE}: only wheels are installed, not "
                                    f"source trees or archives (their build runs code): "
                                    f"{line!r}")


def pip_arguments(policy: str) -> list[str]:
    """pip's flags for installing requirements.txt under a policy that allows it."""
    args = ["install", "--disable-pip-version-check", "--no-input", "--only-binary", ":all:"]
    if policy == "hashes":
        args.append("--require-hashes")
    return [*args, "-r", REQUIREMENTS_FILE]


def _venv_python(venv_dir: Path) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _site_packages(venv_dir: Path) -> Path:
    python = _venv_python(venv_dir)
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                          "'purelib'))"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def install_requirements(workspace: Path, venv_dir: Path, policy: str | None = None) -> Path:
    """Creates venv_dir with workspace/requirements.txt installed; returns its python.
    policy: as requirements_policy (default: what the envoy set in the environment).

    pip runs in the workspace, so requirement lines may name files of the archive
    (`./wheels/pkg-1.0-py3-none-any.whl`)."""
    policy = requirements_policy() if policy is None else policy
    if policy == "refuse":
        raise RequirementsError("this envoy does not let experiments install requirements "
                                "(its sandbox policy: allow_requirements is false); submit "
                                "the experiment without install_requirements")
    requirements = workspace / REQUIREMENTS_FILE
    if not requirements.is_file():
        raise RequirementsError(f"install_requirements is set but the archive has no "
                                f"{REQUIREMENTS_FILE}")
    check_requirements(requirements.read_text(errors="replace"))
    venv.EnvBuilder(with_pip=False, clear=True, symlinks=os.name != "nt").create(venv_dir)
    # Our own site-packages after the experiment's: fedkube stays importable, theirs win.
    parents = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (_site_packages(venv_dir) / "_fedkube_parent.pth").write_text(
        "".join(f"{path}\n" for path in parents))
    python = _venv_python(venv_dir)
    log.info("installing %s into %s", REQUIREMENTS_FILE, venv_dir)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(python), *pip_arguments(policy)],
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
