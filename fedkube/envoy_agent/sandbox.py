"""The sandbox of a local collaborator: the experiment owner's code, confined on the data
owner's machine (docs/concepts.md#sandbox).

The process runtime starts every collaborator through a launcher, `python -m
fedkube.envoy_agent.sandbox`, which reads a LaunchSpec on its standard input. The
launcher runs as the envoy's user, in a session of its own; it dies with the envoy
(PR_SET_PDEATHSIG, here SIGTERM, which it catches) and is the subreaper of everything
the collaborator starts (PR_SET_CHILD_SUBREAPER), so a daemon that double-forks and calls
setsid() is re-parented to it rather than to init. It forks the collaborator and, in
that child, before exec:

- joins the experiment's cgroup (v2, where the envoy could make one), killed whole with
  cgroup.kill at the end;
- where the sandbox user cannot reach a path the collaborator needs (a Python under
  /root, a work directory under a private one), enters a mount namespace of its own and
  covers the first directory it cannot pass with an empty tmpfs holding only those paths,
  bound in at their own place: the rest of that directory stays out of sight;
- changes to the sandbox user (groups, gid, uid), with no new privileges
  (PR_SET_NO_NEW_PRIVS: no setuid program gives any back) and a SIGKILL when the launcher
  dies.

When the collaborator ends, or the launcher is told to stop, or the envoy dies, the
launcher kills the cgroup, then every process below itself until none is left (what was
re-parented to it included), then, for a uid of this envoy's own, every process of that
uid; the envoy does the same again once the launcher is gone.

This module imports nothing heavy: the launcher starts before every collaborator.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import json
import os
import pwd
import signal
import stat
import sys
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedkube.api.environment import ENVOY_PID
from fedkube.api.errors import ConfigError

if TYPE_CHECKING:
    from fedkube.api.config import SandboxSettings

# A uid of an envoy's own: above what distributions, systemd's dynamic users and
# container subuid ranges hand out, below 2**31 (some tools read uids as signed).
DEDICATED_UID_BASE = 2_000_000_000
DEDICATED_UID_SPAN = 1 << 24
ROOT_USERS = ("root", "0", 0)
# What the collaborator gets of the envoy's environment whatever the policy says: none of
# these carries a secret, and programs misbehave without them.
BASE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
KILL_PATIENCE_S = 10.0

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNS = 0x00020000
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18


# -- who the collaborator runs as ---------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """The user a sandboxed collaborator runs as."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    # A uid of this envoy's own: every process of it belongs to the sandbox, so the
    # envoy may kill them all.
    dedicated: bool = False

    def __str__(self) -> str:
        kind = "this envoy's own uid" if self.dedicated else "uid"
        return f"{kind} {self.uid} (gid {self.gid})"


def _taken(uid: int) -> bool:
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def dedicated_uid(envoy: str) -> int:
    """The uid (and gid) of an envoy's collaborators: 2000000000 plus a hash of what tells
    the envoy apart (its name and work directory), the same at every start, another for
    another envoy (but for a hash collision), the next free one where a user or group
    already has it."""
    uid = DEDICATED_UID_BASE + zlib.crc32(envoy.encode()) % DEDICATED_UID_SPAN
    while _taken(uid):
        uid += 1
    return uid


def _named_user(user: str | int) -> Identity:
    if isinstance(user, int) or user.isdigit():
        uid = int(user)
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:  # a bare uid: its own gid, no groups
            return Identity(uid, uid)
    else:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ConfigError(f"sandbox user {user!r}: no such user") from None
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    return Identity(entry.pw_uid, entry.pw_gid, groups)


def sandbox_identity(settings: SandboxSettings, envoy: str, *,
                     euid: int | None = None) -> Identity | None:
    """Who the collaborators of an envoy (envoy: what tells it apart) run as; None: as
    the envoy itself (it is not root, or the settings say root). Raises ConfigError for a
    user that cannot be had."""
    euid = os.geteuid() if euid is None else euid
    user = settings.user
    if euid != 0:
        if user is None or (user not in ROOT_USERS and _named_user(user).uid == euid):
            return None
        raise ConfigError(f"sandbox user {user!r}: only an envoy running as root can run "
                          f"its collaborators as another user")
    if user in ROOT_USERS:
        return None
    if user is None:
        uid = dedicated_uid(envoy)
        return Identity(uid, uid, dedicated=True)
    identity = _named_user(user)
    return None if identity.uid == 0 else identity


# -- what the collaborator sees -----------------------------------------------------------

def sandbox_environment(parent: Mapping[str, str], pass_env: Sequence[str] = ()
                        ) -> dict[str, str]:
    """The envoy's environment as far as a collaborator gets it: BASE_ENV and the names
    the policy passes, nothing else. The runtime adds what the collaborator itself needs."""
    env = {name: parent[name] for name in (*BASE_ENV, *pass_env) if name in parent}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def _allows(st: os.stat_result, identity: Identity, want: int) -> bool:
    """Whether identity has the permission bits want (r=4, w=2, x=1) on st."""
    if st.st_uid == identity.uid:
        bits = st.st_mode >> 6
    elif st.st_gid == identity.gid or st.st_gid in identity.groups:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & want == want


def blocking_directory(path: Path, identity: Identity, below: Path | None = None
                       ) -> Path | None:
    """The first directory above path (resolved), or above it and below `below`, that
    identity may not pass through, by its permission bits (ACLs are not read: a directory
    they open is covered all the same)."""
    for parent in reversed(Path(os.path.realpath(path)).parents):
        if below is not None and (parent == below or not parent.is_relative_to(below)):
            continue
        if not _allows(os.stat(parent), identity, 1):
            return parent
    return None


def readable(path: Path, identity: Identity) -> bool:
    st = os.stat(path)
    return _allows(st, identity, 5 if stat.S_ISDIR(st.st_mode) else 4)


@dataclass(frozen=True)
class Reach:
    """How a sandbox user gets to the paths it needs: `covers` lists, shallowest first,
    each directory it cannot pass, to be covered with a tmpfs, and the paths beneath it to
    bind in at their own place (done in a mount namespace); `problems` the needed paths it
    cannot read even so."""

    covers: list[tuple[str, list[str]]]
    problems: list[str]


def plan_reach(needed: Iterable[Path], identity: Identity,
               optional: Iterable[Path] = ()) -> Reach:
    """needed: paths the collaborator cannot do without; optional: paths bound in where
    they are out of reach but whose own permissions are not checked (sys.path entries,
    directories it only passes through)."""
    pending: dict[Path, set[Path]] = {}
    problems = []
    for paths, required in ((needed, True), (optional, False)):
        for path in paths:
            if not os.path.exists(path):
                continue
            real = Path(os.path.realpath(path))
            if required and not readable(real, identity):
                problems.append(f"{real} is not readable by {identity}")
            if real.is_dir() and not _allows(os.stat(real), identity, 1):
                continue  # of no use to it bound in: what is under it is out of its reach
            blocked = blocking_directory(real, identity)
            if blocked is not None:
                pending.setdefault(blocked, set()).add(real)
    plan = []
    while pending:  # shallowest first: a cover may lie inside an earlier one's bind
        cover = min(pending, key=lambda path: (len(path.parts), str(path)))
        kept: list[Path] = []
        for bind in sorted(pending.pop(cover)):  # a parent sorts before what is under it
            anchor = next((k for k in kept if bind.is_relative_to(k)), None)
            if anchor is None:
                kept.append(bind)
                continue
            # Under another bind, as on the host: a directory there may block it again.
            deeper = blocking_directory(bind, identity, below=anchor)
            if deeper is not None:
                pending.setdefault(deeper, set()).add(bind)
        plan.append((str(cover), [str(bind) for bind in kept]))
    return Reach(plan, problems)


# -- cgroups ------------------------------------------------------------------------------

def cgroup_parent() -> Path | None:
    """This process's cgroup v2 directory, where it may make cgroups; None elsewhere."""
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        own = next((line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines()
                    if line.startswith("0::")), None)
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if "-" in fields and fields[fields.index("-") + 1] == "cgroup2" and own is not None:
            root, mount = fields[3], fields[4]
            if not own.startswith(root):
                return None
            path = Path(mount) / own[len(root):].lstrip("/")
            return path if os.access(path, os.W_OK) else None
    return None


def make_cgroup(parent: Path, name: str) -> Path | None:
    """A new cgroup that can be killed whole (cgroup.kill, Linux 5.14), or None."""
    path = parent / name
    try:
        path.mkdir()
    except OSError:
        return None
    if not (path / "cgroup.kill").exists():
        with contextlib.suppress(OSError):
            path.rmdir()
        return None
    return path


def kill_cgroup(path: Path, timeout: float = KILL_PATIENCE_S) -> None:
    """Kills every process in the cgroup and removes it (gone already: nothing to do)."""
    deadline = time.monotonic() + timeout
    while path.exists():
        try:
            (path / "cgroup.kill").write_text("1")
            if "populated 0" in (path / "cgroup.events").read_text():
                path.rmdir()
        except FileNotFoundError:
            return
        except OSError:  # EBUSY: its last processes are still exiting
            if time.monotonic() > deadline:
                return
        time.sleep(0.01)


# -- processes ----------------------------------------------------------------------------

def _processes() -> dict[int, tuple[int, str]]:
    """pid: (parent pid, state) of every process (Linux /proc)."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:  # the command may hold ")": the fields after its last one are fixed
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        found[int(entry.name)] = (int(fields[1]), fields[0])
    return found


def descendants(root: int) -> list[int]:
    """The live (not zombie) processes below root."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if table[pid][1] != "Z":
            found.append(pid)
        todo += children.get(pid, ())
    return found


def processes_of(uid: int) -> list[int]:
    """The live processes with uid as their real, effective, saved or file-system uid."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            lines = Path(entry.path, "status").read_text().splitlines()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        if fields.get("State", "").strip().startswith("Z"):
            continue
        if str(uid) in fields.get("Uid", "").split():
            found.append(int(entry.name))
    return found


def _reap() -> None:
    """Collects the exit status of every child that has ended (zombies gone)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _kill_all(find: Any, timeout: float) -> None:
    """SIGKILLs what find() returns until it returns nothing (their children re-parent
    and are found next time), reaping our own children between rounds."""
    deadline = time.monotonic() + timeout
    while True:
        _reap()
        pids = find()
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


def kill_descendants(root: int | None = None, timeout: float = KILL_PATIENCE_S) -> None:
    _kill_all(lambda: descendants(os.getpid() if root is None else root), timeout)


def kill_user(uid: int, timeout: float = KILL_PATIENCE_S) -> None:
    """Kills every process of uid (for a uid of the sandbox's own only)."""
    if uid != 0 and uid != os.getuid():
        _kill_all(lambda: processes_of(uid), timeout)


# -- the launcher -------------------------------------------------------------------------

@dataclass
class LaunchSpec:
    """What the launcher runs, and how (JSON on its standard input)."""

    argv: list[str]
    cwd: str
    parent: int  # the envoy's pid: a launcher whose envoy is already gone starts nothing
    uid: int | None = None
    gid: int | None = None
    groups: list[int] = field(default_factory=list)
    dedicated: bool = False
    covers: list[tuple[str, list[str]]] = field(default_factory=list)
    cgroup: str | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()


def launcher_command() -> list[str]:
    return [sys.executable, "-m", "fedkube.envoy_agent.sandbox"]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    return libc


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def _cover(libc: ctypes.CDLL, covers: Sequence[tuple[str, Sequence[str]]]) -> None:
    """In a mount namespace of this process's own: each cover an empty tmpfs holding only
    its binds, each at its own path."""
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "making / private")
    # Opened before any cover hides them.
    sources = {bind: os.open(bind, os.O_PATH | os.O_CLOEXEC)
               for _, binds in covers for bind in binds}
    for cover, binds in covers:
        _check(libc.mount(b"tmpfs", cover.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                          b"mode=0711,size=1m"), f"covering {cover}")
        for bind in binds:
            fd = sources[bind]
            os.makedirs(os.path.dirname(bind), mode=0o711, exist_ok=True)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.makedirs(bind, mode=0o711, exist_ok=True)
            else:
                os.close(os.open(bind, os.O_CREAT | os.O_WRONLY, 0o600))
            _check(libc.mount(f"/proc/self/fd/{fd}".encode(), bind.encode(), None,
                              _MS_BIND | _MS_REC, None), f"binding {bind}")
    for fd in sources.values():
        os.close(fd)


def _exec_collaborator(spec: LaunchSpec, libc: ctypes.CDLL, launcher: int) -> None:
    """In the forked child: confine this process, then become the collaborator."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    if spec.cgroup:
        try:
            Path(spec.cgroup, "cgroup.procs").write_text(str(os.getpid()))
        except OSError as exc:  # the launcher's own clean-up still stands
            os.write(2, f"fedkube sandbox: not in cgroup {spec.cgroup}: {exc}\n".encode())
    if spec.covers:
        _cover(libc, spec.covers)
    os.chdir(spec.cwd)
    os.umask(0o077)
    if spec.uid is not None and spec.gid is not None:
        os.setgroups(spec.groups)
        os.setresgid(spec.gid, spec.gid, spec.gid)
        os.setresuid(spec.uid, spec.uid, spec.uid)
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL), "PR_SET_PDEATHSIG")
    if os.getppid() != launcher:  # the launcher died before the request took effect
        os._exit(1)
    os.execve(spec.argv[0], spec.argv, {**os.environ, ENVOY_PID: str(launcher)})


class _Stop(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


def clean_up(spec: LaunchSpec) -> None:
    """Kills what the collaborator left: its cgroup, what is below the calling process (the
    launcher), and for a uid of the envoy's own every process of it."""
    if spec.cgroup:
        kill_cgroup(Path(spec.cgroup))
    kill_descendants()
    if spec.dedicated and spec.uid is not None:
        kill_user(spec.uid)


def launch(spec: LaunchSpec) -> int:
    """The launcher: runs the collaborator to its end and kills whatever it left; its exit
    code is the collaborator's (128 + n for a signal n)."""
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for signum in stops:
        signal.signal(signum, _stop)
    libc = _libc()
    code = 1
    try:
        _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM), "PR_SET_PDEATHSIG")
        if os.getppid() != spec.parent:  # the envoy died before the request took effect
            return 1
        _check(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1), "PR_SET_CHILD_SUBREAPER")
        launcher = os.getpid()
        child = os.fork()
        if child == 0:
            try:
                _exec_collaborator(spec, libc, launcher)
            except BaseException as exc:
                os.write(2, f"fedkube sandbox: cannot start the collaborator: {exc}\n"
                         .encode())
            os._exit(127)
        while True:  # reaps what is re-parented to us too
            pid, status = os.waitpid(-1, 0)
            if pid == child:
                code = os.waitstatus_to_exitcode(status)
                code = 128 - code if code < 0 else code
                break
    except _Stop as stop:
        code = 128 + stop.signum
    finally:
        for signum in stops:
            signal.signal(signum, signal.SIG_IGN)
        clean_up(spec)
    return code


def probe_namespaces() -> bool:
    """Whether this process may make a mount namespace and mount in it (root with
    CAP_SYS_ADMIN, no seccomp filter against it); tried in a child that then exits."""
    pid = os.fork()
    if pid == 0:
        try:
            libc = _libc()
            _check(libc.unshare(_CLONE_NEWNS), "unshare")
            _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "private")
            _check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, b"size=64k"), "tmpfs")
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def main(argv: Sequence[str]) -> int:
    if list(argv) == ["--probe"]:
        return 0 if probe_namespaces() else 1
    data: dict[str, Any] = json.loads(sys.stdin.buffer.read())
    data["covers"] = [(cover, list(binds)) for cover, binds in data.get("covers", [])]
    return launch(LaunchSpec(**data))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
