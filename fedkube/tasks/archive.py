"""Experiment archives: a zip with `plan.yaml` and, for user tasks, Python modules.

A user module provides `init_model(params)`, `train(model, data, params)` and
`validate(model, data, params)` with the signatures of fedkube.tasks.models. Archives
are extracted defensively: no absolute paths, no `..`, no links or devices, and limits on
member count, member size and total size (against zip bombs).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import lzma
import stat
import struct
import sys
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import yaml
from pydantic import ValidationError

from fedkube.api.errors import FedkubeError
from fedkube.api.plan import PLAN_FILE, USER_TASK_PREFIX, Plan
from fedkube.tasks.models import BUILTIN_TASKS, Task
from fedkube.tasks.params import PARAMS_ATTRIBUTE, check_params, schema_from

MAX_MEMBERS = 1000
MAX_MEMBER_BYTES = 256 << 20
MAX_TOTAL_BYTES = 512 << 20


class ArchiveError(FedkubeError, ValueError):
    """The archive is unsafe or incomplete; the message says which member and why."""


# What zipfile and the decompressors raise on corrupt or hostile bytes (found by fuzzing:
# a damaged extra field raises IndexError, a damaged stream zlib.error, and so on).
_CORRUPT = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, IndexError,
            struct.error, ValueError, NotImplementedError, RuntimeError, zlib.error,
            lzma.LZMAError, UnicodeDecodeError, OverflowError)


@contextlib.contextmanager
def _reading(what: str) -> Iterator[None]:
    """Turns zipfile's many failures on bad bytes into one ArchiveError."""
    try:
        yield
    except ArchiveError:
        raise
    except _CORRUPT as exc:
        raise ArchiveError(f"{what}: {type(exc).__name__}: {exc}") from exc


def _check_member(info: zipfile.ZipInfo) -> PurePosixPath:
    name = info.filename
    path = PurePosixPath(name)
    if not path.parts or any(ord(c) < 32 for c in name):
        raise ArchiveError(f"{name!r}: empty names and control characters are not allowed")
    if name.startswith(("/", "\\")) or path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"{name!r}: absolute paths are not allowed")
    if ".." in path.parts or "\\" in name:
        raise ArchiveError(f"{name!r}: parent-directory references are not allowed")
    kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the writer recorded no type
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ArchiveError(f"{name!r}: links and device files are not allowed")
    if info.file_size > MAX_MEMBER_BYTES:
        raise ArchiveError(f"{name!r}: {info.file_size} bytes exceeds {MAX_MEMBER_BYTES}")
    return path


def _open(archive: Path | bytes) -> zipfile.ZipFile:
    with _reading("not a readable zip archive"):
        return zipfile.ZipFile(io.BytesIO(archive) if isinstance(archive, bytes) else archive)


def _check_members(source: zipfile.ZipFile) -> list[PurePosixPath]:
    members = source.infolist()
    if len(members) > MAX_MEMBERS:
        raise ArchiveError(f"{len(members)} members exceeds {MAX_MEMBERS}")
    paths = [_check_member(info) for info in members]
    if sum(info.file_size for info in members) > MAX_TOTAL_BYTES:
        raise ArchiveError(f"archive expands past {MAX_TOTAL_BYTES} bytes")
    return paths


def check_archive(archive: Path | bytes) -> Plan:
    """Checks every member as safe_extract would, and returns the plan."""
    with _open(archive) as source, _reading("corrupt archive"):
        _check_members(source)
    return read_plan(archive)


def safe_extract(archive: Path | bytes, dest: Path) -> list[Path]:
    """Extracts every member under dest after checking them all; returns the files."""
    with _open(archive) as source, _reading("cannot extract the archive"):
        members = source.infolist()
        paths = _check_members(source)
        written = []
        dest.mkdir(parents=True, exist_ok=True)
        for info, path in zip(members, paths, strict=True):
            target = dest.joinpath(*path.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with source.open(info) as src, target.open("wb") as out:
                # Count what comes out, not what the header claims.
                remaining = info.file_size
                while chunk := src.read(1 << 20):
                    remaining -= len(chunk)
                    if remaining < 0:
                        raise ArchiveError(f"{info.filename!r} inflates past its declared size")
                    out.write(chunk)
            written.append(target)
        return written


def read_plan(archive: Path | bytes) -> Plan:
    """The plan of an archive, without extracting anything else."""
    try:
        with _open(archive) as z, _reading(f"cannot read {PLAN_FILE}"):
            info = z.getinfo(PLAN_FILE)
            _check_member(info)
            text = z.read(info).decode()
    except KeyError as exc:
        raise ArchiveError(f"the archive has no {PLAN_FILE}") from exc
    try:
        return Plan.model_validate(yaml.safe_load(text) or {})
    except (ValidationError, yaml.YAMLError) as exc:
        raise ArchiveError(f"invalid {PLAN_FILE}: {exc}") from exc


def build_archive(plan: Plan, files: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(PLAN_FILE, yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False))
        for name, data in (files or {}).items():
            z.writestr(name, data)
    return buffer.getvalue()


def load_task(plan: Plan, workspace: Path | None) -> Task:
    """The task's functions: built in, or a module extracted into workspace."""
    if not plan.task.startswith(USER_TASK_PREFIX):
        try:
            return BUILTIN_TASKS[plan.task]
        except KeyError:
            raise ArchiveError(f"unknown task {plan.task!r}: the built-in tasks are "
                               f"{', '.join(sorted(BUILTIN_TASKS))}; for your own module, "
                               f"'archive:MODULE' (fedkube experiment submit --archive "
                               f"MODULE.py)") from None
    module_name = plan.task.removeprefix(USER_TASK_PREFIX)
    if workspace is None or not (workspace / f"{module_name}.py").is_file():
        raise ArchiveError(f"the archive has no {module_name}.py")
    spec = importlib.util.spec_from_file_location(f"fedkube_user_task_{module_name}",
                                                  workspace / f"{module_name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    missing = [f for f in ("init_model", "train", "validate") if not callable(getattr(module, f,
                                                                                     None))]
    if missing:
        raise ArchiveError(f"{module_name}.py lacks {missing}")
    schema = schema_from(getattr(module, PARAMS_ATTRIBUTE, None), module=module_name)
    return Task(plan.task, module.init_model, module.train, module.validate, schema)


def check_builtin_plan(plan: Plan) -> None:
    """A built-in task's plan: its task exists (ArchiveError) and its params fit the
    task's schema (fedkube.tasks.params.ParamsError). User tasks pass: their schema is in
    their module, which only envoys and the owner's client import."""
    if plan.task.startswith(USER_TASK_PREFIX):
        return
    task = load_task(plan, None)
    check_params(plan.task, task.params, plan.params)
