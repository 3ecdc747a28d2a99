"""Where OpenFL's own collaborator code runs for a fedkube envoy: the Python of an OpenFL
1.6 environment (OpenFL pins protobuf<5, fedkube must not), named by the envoy's
`openfl_python`, or else built once under ~/.cache/fedkube and reused."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import venv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedkube.api.errors import FedkubeError

log = logging.getLogger(__name__)

ENTRY = Path(__file__).with_name("collaborator_entry.py")
OPENFL_PYTHON_ENV = "FEDKUBE_OPENFL_PYTHON"
# OpenFL 1.6's director and collaborator call np.reshape(newshape=...), gone in numpy 2.4.
REQUIREMENTS = ("openfl==1.6", "numpy<2.1")
BUILD_TIMEOUT_S = 1800
DESCRIBE_TIMEOUT_S = 300
DESCRIPTOR_PREFIX = "openfl:"  # a shard loader that is an OpenFL ShardDescriptor class


class OpenFLEnvironmentError(FedkubeError, RuntimeError):
    """No OpenFL environment could be found or built; the message says why."""


def default_venv() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / (
        "fedkube/openfl-1.6-venv")


def openfl_python(configured: Path | None = None) -> Path:
    """The configured Python, else $FEDKUBE_OPENFL_PYTHON, else the cached environment
    (built on first use, under a lock so concurrent collaborators build it once)."""
    if configured is None and os.environ.get(OPENFL_PYTHON_ENV):
        configured = Path(os.environ[OPENFL_PYTHON_ENV])
    if configured is not None:
        if not configured.is_file():
            raise OpenFLEnvironmentError(f"openfl_python {configured} does not exist")
        return configured
    target = default_venv()
    python = target / "bin" / "python"
    stamp = target / ".installed"
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".openfl-venv.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            log.info("building the OpenFL 1.6 environment in %s (once)", target)
            venv.EnvBuilder(with_pip=True, clear=True).create(target)
            result = subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                 *REQUIREMENTS], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if result.returncode != 0:
                raise OpenFLEnvironmentError(
                    f"installing {' '.join(REQUIREMENTS)} failed: {result.stderr[-500:]}")
            stamp.touch()
    return python


def descriptor_params(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A descriptor's params as its envoy_config.yaml would type them: `--shard-option`
    strings read as YAML scalars ("3" is 3, "true" True, "1,2" stays "1,2"), so the envoy
    (typed config) and its collaborators (flags) pass the same values."""
    params = {}
    for key, value in (options or {}).items():
        try:
            params[key] = yaml.safe_load(value) if isinstance(value, str) else value
        except yaml.YAMLError:
            params[key] = value
    return params


def search_path(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for OpenFL code: the working directory importable first, as under
    `fx envoy start`, where the data owner's shard descriptor module lives."""
    paths = [os.getcwd(), *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**environ, "PYTHONPATH": os.pathsep.join(paths)}


def entry_args(python: Path, *, workspace: Path, name: str, descriptor: str | None = None,
               params: Mapping[str, Any] | None = None, arrays: Path | None = None,
               cuda_devices: Sequence[int] = (), tls: Sequence[str] = ()) -> list[str]:
    shard = (["--arrays", str(arrays)] if arrays is not None
             else ["--descriptor", str(descriptor), "--params", json.dumps(dict(params or {}))])
    return [str(python), str(ENTRY), "--workspace", str(workspace), "--name", name, *shard,
            "--cuda-devices", ",".join(map(str, cuda_devices)), *tls]


def describe_descriptor(python: Path, descriptor: str, params: Mapping[str, Any]
                        ) -> dict[str, Any]:
    """An OpenFL ShardDescriptor's description, shapes and train size, from its own
    environment."""
    args = [*entry_args(python, workspace=Path.cwd(), name="-", descriptor=descriptor,
                        params=params), "--describe"]
    try:
        result = subprocess.run(args, capture_output=True, text=True, env=search_path(
            os.environ), timeout=DESCRIBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise OpenFLEnvironmentError(f"{descriptor} took over {DESCRIBE_TIMEOUT_S} s to "
                                     f"load") from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise OpenFLEnvironmentError(f"cannot load shard descriptor {descriptor}: "
                                     f"{lines[-1] if lines else result.returncode}")
    described: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return described




