"""Local mode: a director and envoys as separate processes on this machine.

Used by `fedkube demo` and by the tests; every process is a real `fedkube` command.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.05,
             message: str = "condition") -> None:
    """Polls predicate until it is true; raises TimeoutError naming what was awaited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is pid (Linux /proc), e.g. a director's frontends."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:  # the command may hold ")": the fields after its last one are fixed
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
        if parent == pid:
            children.append(int(entry.name))
    return children


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


@dataclass
class Process:
    """A `fedkube` subprocess whose output goes to a log file."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    log_format: str = "plain"
    popen: subprocess.Popen[bytes] | None = None
    cwd: Path | None = None  # where it runs (None: here)
    _log: IO[bytes] | None = None

    def command(self) -> list[str]:
        """What start() runs: the fedkube command line with these arguments."""
        return [sys.executable, "-m", "fedkube.cli", "--log-format", self.log_format,
                *self.args]

    def start(self) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.popen = subprocess.Popen(
            self.command(), cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.running:
            assert self.popen is not None
            self.popen.send_signal(sig)
            self.popen.wait(timeout=30)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 10 s; returns the exit code."""
        if self.popen is None:
            return None
        if self.running:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.popen.returncode

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout=timeout)


def tls_args(cert_dir: Path | None, name: str) -> list[str]:
    if cert_dir is None:
        return ["--insecure"]
    return ["--ca", str(cert_dir / "ca.crt"), "--cert", str(cert_dir / f"{name}.crt"),
            "--key", str(cert_dir / f"{name}.key")]


def director_process(work: Path, port: int, *, period: float = 2.0,
                     cert_dir: Path | None = None, extra: Sequence[str] = (),
                     name: str = "director") -> Process:
    return Process(name, [
        "director", "start", "--host", "127.0.0.1", "--port", str(port),
        "--data-dir", str(work / "director"), "--health-check-period", str(period),
        *tls_args(cert_dir, "director"), *extra,
    ], work / "logs" / f"{name}.log")


def envoy_process(work: Path, name: str, port: int, *, index: int, count: int,
                  cert_dir: Path | None = None, extra: Sequence[str] = (),
                  policy: Path | None = None) -> Process:
    return Process(name, [
        "envoy", "start", "--name", name, "--director", f"localhost:{port}",
        "--shard", "digits", "--shard-option", f"index={index}",
        "--shard-option", f"count={count}", "--work-dir", str(work / name),
        *tls_args(cert_dir, name), *(["--policy", str(policy)] if policy else []), *extra,
    ], work / "logs" / f"{name}.log")


def spawn_logged(log_dir: Path, name: str, args: list[str]) -> subprocess.Popen[bytes]:
    """args in a session of their own, output appended to log_dir/<name>.log."""
    with (log_dir / f"{name}.log").open("ab") as log:  # the child keeps its copy
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def tail_logs(log_dir: Path, names: Iterable[str], tail: int = 3000) -> str:
    """The last `tail` characters of each named log, headed by its name."""
    parts = []
    for name in names:
        text = (log_dir / f"{name}.log").read_text(errors="replace")
        parts.append(f"----- {name} -----\n{text[-tail:]}")
    return "\n".join(parts)
