"""A collaborator process from start to stop: bound to its envoy, its certificate
requested where it asks for one, its experiment's archive fetched and unpacked, its
requirements installed (re-executing itself in their virtualenv), then the rounds."""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedkube.api.config import TLSSettings
from fedkube.api.errors import ConfigError


def exit_on_sigterm() -> None:
    """SIGTERM (its Pod deleted) ends the collaborator at once, its `finally` blocks run, with
    the shell's code for it (143). The rounds are a blocking loop, so the handler raises
    where the main thread is; gRPC's blocking calls wait in short slices, so it comes
    within a fraction of a second even mid-call. Without it, as a Pod's PID 1 the
    collaborator ignores SIGTERM and waits for the kubelet's SIGKILL."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers are the main thread's (a test calling in-process)

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cleanup is not cut short
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)


@dataclass(frozen=True)
class CollaboratorOptions:
    director: str
    experiment: str
    name: str
    work_dir: Path
    shard: str = "digits"
    shard_options: Mapping[str, str] | None = None
    archive: Path | None = None  # default: downloaded from the director
    insecure: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    request_certificate: bool = False  # on Kubernetes: first request cert/key from the operator
    openfl_python: Path | None = None  # for OpenFL experiments (fedkube.openfl.environment)


def run_collaborator(options: CollaboratorOptions, argv: list[str]) -> None:
    """argv: this command's own arguments, to re-execute it in the experiment's venv.
    Raises RequirementsError when the experiment's requirements cannot be installed."""
    from fedkube.collaborator import environment
    from fedkube.collaborator.lifetime import bind_to_envoy
    from fedkube.collaborator.run import Collaborator, extract, fetch_archive
    from fedkube.openfl.workspace import is_openfl_archive
    from fedkube.tasks.archive import load_task
    from fedkube.tasks.shard import load_shard
    from fedkube.transport.tls import TLSFiles

    exit_on_sigterm()
    bind_to_envoy()
    renew: Callable[[], None] | None = None
    if options.request_certificate:
        if options.insecure or not (options.ca and options.cert and options.key):
            raise ConfigError("--request-certificate needs --ca/--cert/--key, not --insecure")
        from fedkube.kube.csr import request_certificate

        renew = functools.partial(request_certificate, options.name, "collaborator",
                                  cert_path=options.cert, key_path=options.key)
        renew()
    files = (None if options.insecure
             else TLSSettings(ca=options.ca, cert=options.cert, key=options.key))
    tls = None if files is None else TLSFiles.load(files)
    archive = options.archive or fetch_archive(options.director, tls, options.experiment,
                                               options.name, options.work_dir / "archive.zip")
    if is_openfl_archive(archive):
        from fedkube.collaborator.openfl import run_openfl_collaborator

        run_openfl_collaborator(options, archive)  # does not return
    plan, workspace = extract(archive, options.work_dir)
    venv_dir = options.work_dir / "venv"
    if plan.install_requirements and not environment.in_venv(venv_dir):
        python = environment.install_requirements(workspace, venv_dir)
        environment.reexec_in(python, venv_dir, argv)
    task = load_task(plan, workspace)
    shard = load_shard(options.shard, dict(options.shard_options or {}))
    collaborator = Collaborator(target=options.director, experiment=options.experiment,
                                name=options.name, plan=plan, task=task, shard=shard, tls=tls,
                                certificate_files=files, renew_certificate=renew)
    try:
        collaborator.run()
    finally:
        collaborator.close()
        sys.stdout.flush()
