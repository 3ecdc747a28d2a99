"""An OpenFL experiment's collaborator: OpenFL 1.6's own code, in its own environment
(fedkube.openfl.environment), with the archive extracted and the shard handed over."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from fedkube.openfl.environment import (
    DESCRIPTOR_PREFIX,
    descriptor_params,
    entry_args,
    openfl_python,
    search_path,
)
from fedkube.tasks.archive import safe_extract
from fedkube.tasks.shard import load_shard

if TYPE_CHECKING:
    from fedkube.collaborator.main import CollaboratorOptions


def write_arrays(options: CollaboratorOptions, path: Path) -> Path:
    """A fedkube shard loader's splits as the arrays an OpenFL descriptor serves."""
    shard = load_shard(options.shard, dict(options.shard_options or {}))
    (train_x, train_y), (val_x, val_y) = shard.get_dataset("train"), shard.get_dataset("val")
    meta = {"description": shard.dataset_description, "sample_shape": shard.sample_shape,
            "target_shape": shard.target_shape}
    np.savez(path, train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y,
             meta=np.array(json.dumps(meta)))
    return path


def visible_devices() -> list[int]:
    """The GPUs the envoy gave this collaborator, as OpenFL's device indices: 0..n-1 of
    CUDA_VISIBLE_DEVICES when the envoy named some, else every GPU NVML shows (as the
    envoy's own monitor does), none without a driver."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        visible = [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        return list(range(len(visible)))
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver: no GPUs
        return []
    try:
        return list(range(pynvml.nvmlDeviceGetCount()))
    finally:
        pynvml.nvmlShutdown()


def run_openfl_collaborator(options: CollaboratorOptions, archive: Path) -> NoReturn:
    """Replaces this process with OpenFL's collaborator: it keeps the envoy binding and
    the PID the envoy waits on, and its exit code is the collaborator's."""
    workspace = options.work_dir / "workspace"
    safe_extract(archive, workspace)
    python = openfl_python(options.openfl_python)
    # Absolute: OpenFL's collaborator runs in the workspace, not where these were named.
    tls = ([] if options.insecure else
           [arg for flag, path in (("--ca", options.ca), ("--cert", options.cert),
                                   ("--key", options.key))
            for arg in (flag, str(Path(str(path)).resolve()))])
    descriptor = arrays = None
    if options.shard.startswith(DESCRIPTOR_PREFIX):
        descriptor = options.shard.removeprefix(DESCRIPTOR_PREFIX)
    else:
        arrays = write_arrays(options, options.work_dir / "shard.npz")
    args = entry_args(python, workspace=workspace.resolve(), name=options.name,
                      descriptor=descriptor, params=descriptor_params(options.shard_options),
                      arrays=arrays, cuda_devices=visible_devices(), tls=tls)
    os.execve(args[0], args, search_path(os.environ))
