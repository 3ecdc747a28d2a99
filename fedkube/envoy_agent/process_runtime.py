"""The local collaborator runtime: `fedkube collaborator run` as a subprocess of the
envoy (local mode, tests), seeing only the envoy's GPUs, dying with the envoy, and
confined by the envoy's sandbox (fedkube.envoy_agent.sandbox, docs/concepts.md#sandbox):
a minimal environment, a directory of its own, a user of its own when the envoy is root,
none of the envoy's files, and nothing it starts outliving it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import fedkube
from fedkube.api.config import REQUIREMENTS_POLICY_ENV, EnvoyConfig
from fedkube.envoy_agent import sandbox
from fedkube.envoy_agent.runtime import CollaboratorFailed, CollaboratorJob
from fedkube.envoy_agent.sandbox import Identity, LaunchSpec

log = logging.getLogger(__name__)

CREDENTIALS_SYNC_S = 5.0  # how often the envoy's renewed certificate is copied over
STOP_PATIENCE_S = 10.0  # between SIGTERM to the launcher and SIGKILL
LOG_TAIL_BYTES = 16 << 20  # what of a collaborator's output the envoy reads back
SANDBOX_DIR = "sandbox"  # in the experiment's directory: the collaborator's own
CREDENTIALS_DIR = "credentials"  # beside it, the envoy's: the copies it hands over


def _last_error(text: str) -> str:
    """The exception line of a traceback, or the last line of output."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith((" ", "\t", "Traceback")) and ("Error" in line or
                                                              "Exception" in line):
            return line.strip()
    return lines[-1].strip() if lines else "no output"


def collaborator_environment(parent: Mapping[str, str], cuda_devices: Sequence[int],
                             pass_env: Sequence[str] = ()) -> dict[str, str]:
    """What the collaborator gets of the envoy's environment: the sandbox's minimal one
    (and the names the policy passes), with the envoy's GPUs when it names some. An envoy
    that names none owns whatever its own environment shows it (as its NVML monitor
    does), so the collaborator inherits that unchanged."""
    env = sandbox.sandbox_environment(parent, pass_env)
    if cuda_devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, cuda_devices))
    elif "CUDA_VISIBLE_DEVICES" in parent:
        env["CUDA_VISIBLE_DEVICES"] = parent["CUDA_VISIBLE_DEVICES"]
    return env


def runtime_paths() -> tuple[list[Path], list[Path]]:
    """The paths a collaborator needs to run this envoy's Python and fedkube, and those it
    may import from (sys.path: the envoy's working directory, where shard loaders and
    OpenFL descriptors live, among them)."""
    needed = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
              os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable)),
              os.path.dirname(os.path.abspath(fedkube.__file__))}
    needed.update(path for key in ("stdlib", "platstdlib", "purelib", "platlib")
                  if (path := sysconfig.get_path(key)))
    optional = {path for path in sys.path if path and os.path.isdir(path)}
    optional.add(os.getcwd())
    return [Path(p) for p in sorted(needed)], [Path(p) for p in sorted(optional - needed)]


def envoy_key(config: EnvoyConfig) -> str:
    """What tells this envoy from any other on the machine, also one of the same name (of
    another federation, another test): its name and its work directory."""
    return f"{config.name}\0{config.work_dir.resolve()}"


def requirements_policy(allow: bool, hashes: bool) -> str:
    """The value of REQUIREMENTS_POLICY_ENV for fedkube.collaborator.environment."""
    return "hashes" if allow and hashes else "binary" if allow else "refuse"


def _write_private(path: Path, data: bytes, identity: Identity | None) -> None:
    """path (in a directory only the envoy may write) with data, mode 0600, owned by
    identity; by rename, so a reader never sees half a file."""
    staged = path.with_name(f".{path.name}.new")
    staged.unlink(missing_ok=True)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        if identity is not None:
            os.fchown(fd, identity.uid, identity.gid)
    finally:
        os.close(fd)
    staged.replace(path)


def _new_private(path: Path, mode: str) -> IO[bytes]:
    """path made afresh, mode 0600 (a file of the envoy's, in its own directory)."""
    path.unlink(missing_ok=True)
    flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | (os.O_RDWR if "+" in mode else
                                                      os.O_WRONLY)
    return open(os.open(path, flags, 0o600), mode)


def _tail(sink: IO[bytes]) -> str:
    """The last LOG_TAIL_BYTES of what the collaborator wrote."""
    sink.seek(max(0, sink.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
    return sink.read().decode(errors="replace")


class ProcessRuntime:
    """Runs the collaborator as `fedkube collaborator run`, through the sandbox's launcher."""

    def __init__(self, config: EnvoyConfig) -> None:
        self.config = config
        self.settings = config.sandbox
        self.identity = sandbox.sandbox_identity(config.sandbox, envoy_key(config))
        self.namespaces = self.identity is not None and subprocess.run(
            [*sandbox.launcher_command(), "--probe"], stdin=subprocess.DEVNULL,
            capture_output=True, timeout=60).returncode == 0
        self.cgroups = sandbox.cgroup_parent()
        key = zlib.crc32(envoy_key(config).encode())
        self._cgroup_prefix = f"fedkube-{config.name[:40]}-{key:08x}-"
        self._sweep()
        if self.identity is None:
            log.info("collaborators of %s run as the envoy's own user (uid %d)", config.name,
                     os.geteuid())
        else:
            log.info("collaborators of %s run as %s%s", config.name, self.identity,
                     "" if self.cgroups is None else ", each in a cgroup of its own")

    def _sweep(self) -> None:
        """What a killed envoy's collaborator left: its processes, cgroups, and the
        sandboxes holding copies of this envoy's credentials."""
        work = self.config.work_dir
        work.mkdir(parents=True, exist_ok=True)
        if self.identity is not None:
            # Only the envoy enters its directory (the collaborator's own is bound in or,
            # without mount namespaces, reached through it without listing it).
            work.chmod(0o700 if self.namespaces else 0o711)
            if self.identity.dedicated:
                sandbox.kill_user(self.identity.uid)
        if self.cgroups is not None:
            for stale in self.cgroups.glob(f"{self._cgroup_prefix}*"):
                sandbox.kill_cgroup(stale)
        for stale in (*work.glob(f"*/{SANDBOX_DIR}"), *work.glob(f"*/{CREDENTIALS_DIR}")):
            shutil.rmtree(stale, ignore_errors=True)

    # -- the sandbox of one experiment -----------------------------------------------------

    def _refuse_requirements(self, archive: Path) -> None:
        from fedkube.tasks.archive import read_plan

        if read_plan(archive).install_requirements and not self.settings.allow_requirements:
            raise CollaboratorFailed(
                f"RequirementsError: shard {self.config.name} does not let experiments "
                f"install requirements (its sandbox policy: allow_requirements is false); "
                f"submit the experiment without install_requirements")

    def _confine(self, job: CollaboratorJob, own: Sequence[Path], passed: Sequence[Path],
                 extra: Sequence[Path]) -> tuple[Identity | None, list[tuple[str, list[str]]]]:
        """Who runs this collaborator, and what the launcher binds in for it (own: paths it
        reads, passed: paths it only passes through). With the default user, a host where
        it cannot reach the envoy's Python runs it as the envoy (said in the log); with a
        user the policy names, that fails the experiment."""
        identity = self.identity
        if identity is None:
            return None, []
        needed, optional = runtime_paths()
        reach = sandbox.plan_reach([*needed, *extra, *own], identity, [*optional, *passed])
        why = reach.problems[0] if reach.problems else None
        if why is None and reach.covers and not self.namespaces:
            cover, binds = reach.covers[0]
            why = (f"{identity} cannot enter {cover} (on the way to {binds[0]}) and this "
                   f"host gives the envoy no mount namespaces")
        if why is None:
            return identity, reach.covers
        if self.settings.user is None:
            log.warning("experiment %s: its collaborator runs as the envoy's own user: %s",
                        job.experiment, why)
            return None, []
        raise CollaboratorFailed(f"cannot sandbox the collaborator: {why}")

    def _prepare(self, job: CollaboratorJob, identity: Identity | None) -> tuple[Path, Path]:
        """The collaborator's own directory (its home, its work directory, with a copy of
        the archive), made afresh, and the envoy's beside it for the credentials."""
        if identity is not None:
            job.work_dir.chmod(0o700 if self.namespaces else 0o711)
            job.archive.chmod(0o600)
        # Absolute: the collaborator runs in its own directory, not where the envoy does.
        work = job.work_dir.resolve()
        own, credentials = work / SANDBOX_DIR, work / CREDENTIALS_DIR
        for path in (own, credentials):
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(mode=0o700)
        (own / "tmp").mkdir(mode=0o700)
        shutil.copyfile(job.archive, own / "archive.zip")
        if identity is not None:  # all written: only now does it become theirs
            credentials.chmod(0o711)
            for path in (own / "archive.zip", own / "tmp", own):
                os.chown(path, identity.uid, identity.gid)
        return own, credentials

    def _credentials(self, credentials: Path, identity: Identity | None
                     ) -> tuple[list[str], list[tuple[Path, Path]]]:
        """The collaborator's TLS flags, and (source, copy) for each file it gets a copy
        of. A collaborator of another user gets copies only it may read, in a directory
        of the envoy's: the envoy's own key file stays out of its reach."""
        tls = self.config.tls
        if tls.insecure:
            return ["--insecure"], []
        assert tls.ca and tls.cert and tls.key  # checked by TLSSettings
        sources = [Path(tls.ca).resolve(), Path(tls.cert).resolve(), Path(tls.key).resolve()]
        if identity is None:
            files = sources
            copies = []
        else:
            files = [credentials / name for name in ("ca.crt", "tls.crt", "tls.key")]
            copies = list(zip(sources, files, strict=True))
            for source, copy in copies:
                _write_private(copy, source.read_bytes(), identity)
        return ["--ca", str(files[0]), "--cert", str(files[1]), "--key", str(files[2])], copies

    async def _sync_credentials(self, copies: Sequence[tuple[Path, Path]],
                                identity: Identity | None) -> None:
        """Copies the envoy's certificate over again when it was renewed."""
        while True:
            await asyncio.sleep(CREDENTIALS_SYNC_S)
            for source, copy in copies:
                try:
                    data = source.read_bytes()
                    if data != copy.read_bytes():
                        _write_private(copy, data, identity)
                except OSError as exc:  # caught mid-renewal: next time
                    log.debug("cannot copy %s: %s", source, exc)

    def _environment(self, job: CollaboratorJob, own: Path) -> dict[str, str]:
        env = collaborator_environment(os.environ, job.cuda_devices, self.settings.pass_env)
        paths = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env.update({
            "HOME": str(own), "TMPDIR": str(own / "tmp"), "PYTHONUNBUFFERED": "1",
            # Shard loaders and OpenFL descriptors are imported from where the envoy runs.
            "PYTHONPATH": os.pathsep.join(paths),
            REQUIREMENTS_POLICY_ENV: requirements_policy(self.settings.allow_requirements,
                                                         self.settings.require_hashes)})
        return env

    # -- running it ------------------------------------------------------------------------

    async def run(self, job: CollaboratorJob) -> None:
        from fedkube.openfl.workspace import is_openfl_archive

        job.work_dir.mkdir(parents=True, exist_ok=True)
        python = None
        if is_openfl_archive(job.archive):
            from fedkube.openfl.environment import openfl_python

            # Found (or built, once) here: the collaborator's home is its own.
            python = await asyncio.to_thread(openfl_python, self.config.openfl_python)
        else:
            self._refuse_requirements(job.archive)
        spec, env, copies, identity = self._setup(job, python)
        log_path = job.work_dir / "collaborator.log"  # the envoy's: the task cannot swap it
        with _new_private(log_path, "w+b") as sink:
            code = await self._launch(spec, sink, env, copies, identity)
            output = _tail(sink)
        shutil.rmtree(job.work_dir / CREDENTIALS_DIR, ignore_errors=True)
        if self.config.work_dir:
            with _new_private(self.config.work_dir / f"{job.experiment}.collaborator.log",
                              "wb") as copy:
                copy.write(output.encode())
        if code != 0:
            raise CollaboratorFailed(_last_error(output), code=code)

    def _setup(self, job: CollaboratorJob, openfl_python: Path | None
               ) -> tuple[LaunchSpec, dict[str, str], list[tuple[Path, Path]], Identity | None]:
        """The sandbox of this experiment, and what the launcher is to run in it."""
        extra, openfl_args = [], []
        if openfl_python is not None:
            python = Path(os.path.abspath(openfl_python))
            extra = [python.parent.parent, Path(os.path.realpath(python)).parent.parent]
            openfl_args = ["--openfl-python", str(python)]
        own, credentials = self._prepare(job, self.identity)
        identity, covers = self._confine(job, [own], [credentials], extra)
        tls_args, copies = self._credentials(credentials, identity)
        options = [arg for key, value in self.config.shard.options.items()
                   for arg in ("--shard-option", f"{key}={value}")]
        args = [sys.executable, "-m", "fedkube.cli", "--log-format", "plain", "collaborator",
                "run", "--director", self.config.director, "--experiment", job.experiment,
                "--name", job.collaborator, "--archive", str(own / "archive.zip"),
                "--work-dir", str(own), "--shard", self.config.shard.loader, *options,
                *tls_args, *openfl_args]
        cgroup = None if self.cgroups is None else sandbox.make_cgroup(
            self.cgroups, f"{self._cgroup_prefix}{secrets.token_hex(4)}")
        spec = LaunchSpec(
            argv=args, cwd=str(own), parent=os.getpid(),
            uid=None if identity is None else identity.uid,
            gid=None if identity is None else identity.gid,
            groups=[] if identity is None else list(identity.groups),
            dedicated=identity is not None and identity.dedicated, covers=covers,
            cgroup=None if cgroup is None else str(cgroup))
        return spec, self._environment(job, own), copies, identity

    async def _launch(self, spec: LaunchSpec, sink: IO[bytes], env: dict[str, str],
                      copies: Sequence[tuple[Path, Path]], identity: Identity | None) -> int:
        """Starts the launcher, waits for its end (the collaborator's), and kills whatever
        is left of the sandbox; the collaborator's exit code."""
        process = sync = None
        try:
            process = await asyncio.create_subprocess_exec(
                *sandbox.launcher_command(), stdin=asyncio.subprocess.PIPE, stdout=sink,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True)
            if copies:
                sync = asyncio.get_running_loop().create_task(
                    self._sync_credentials(copies, identity))
            assert process.stdin is not None
            with contextlib.suppress(ConnectionError):  # gone at once: its code says why
                process.stdin.write(spec.encode())
                await process.stdin.drain()
                process.stdin.close()
            return await process.wait()
        except asyncio.CancelledError:
            if process is not None:
                await self._stop(process)
            raise
        finally:
            if sync is not None:
                sync.cancel()
            await asyncio.to_thread(self._clean_up, spec, process)

    @staticmethod
    async def _stop(process: asyncio.subprocess.Process) -> None:
        """The envoy is stopping: the launcher kills the collaborator and what it left."""
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_PATIENCE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    @staticmethod
    def _clean_up(spec: LaunchSpec, process: asyncio.subprocess.Process | None) -> None:
        """Once the launcher is gone (or never started): what it may not have killed (it
        was killed itself)."""
        if process is not None and process.returncode is not None and process.returncode < 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # its session's first group is its own
        if spec.cgroup:
            sandbox.kill_cgroup(Path(spec.cgroup))
        if spec.dedicated and spec.uid is not None:
            sandbox.kill_user(spec.uid)
