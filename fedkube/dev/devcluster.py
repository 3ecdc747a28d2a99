"""`fedkube dev cluster up|status|down`: the tests' control plane (fedkube.dev.cluster) for
a developer, in the background, found again through a state file in its directory.

`up` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok in
sessions of their own, so they outlive the command; it writes DIR/state.json (each
component's pid and start time, so a reused pid is never mistaken for it), links kubectl
and helm into DIR/bin, and prints the `export` lines for KUBECONFIG and PATH on stdout
(everything else goes to stderr, so `eval "$(fedkube dev cluster up)"` works). `down`
stops what the state file names; `status` says what runs.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE = "state.json"
TOOLS = ("kubectl", "helm")  # what DIR/bin links, for PATH


def say(line: str) -> None:
    """Progress for a person: stderr, so that stdout stays `eval`-able."""
    print(line, file=sys.stderr, flush=True)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc), None when it is gone
    or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


@dataclass(frozen=True)
class Component:
    name: str
    pid: int
    started: int  # clock ticks since boot, from /proc/PID/stat

    @property
    def running(self) -> bool:
        return _start_time(self.pid) == self.started


@dataclass(frozen=True)
class DevCluster:
    """What state.json records of a started cluster."""

    work: Path
    kubeconfig: Path
    server: str
    bin_dir: Path
    components: tuple[Component, ...]

    @property
    def tools(self) -> Path:
        return self.work / "bin"

    @property
    def running(self) -> bool:
        return all(c.running for c in self.components)

    def exports(self) -> str:
        return (f"export KUBECONFIG={shlex.quote(str(self.kubeconfig))}\n"
                f"export PATH={shlex.quote(str(self.tools))}:\"$PATH\"\n")

    def save(self) -> None:
        state = {"kubeconfig": str(self.kubeconfig), "server": self.server,
                 "bin_dir": str(self.bin_dir),
                 "components": [{"name": c.name, "pid": c.pid, "started": c.started}
                                for c in self.components]}
        (self.work / STATE).write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, work: Path) -> DevCluster | None:
        try:
            state: dict[str, Any] = json.loads((work / STATE).read_text())
        except (OSError, ValueError):
            return None
        return cls(work, Path(state["kubeconfig"]), state["server"], Path(state["bin_dir"]),
                   tuple(Component(c["name"], int(c["pid"]), int(c["started"]))
                         for c in state["components"]))


def _link_tools(tools: Path, bin_dir: Path) -> None:
    tools.mkdir(parents=True, exist_ok=True)
    for name in TOOLS:
        link = tools / name
        link.unlink(missing_ok=True)
        link.symlink_to(bin_dir / name)


def start(work: Path) -> tuple[DevCluster, bool]:
    """The cluster in work, started unless it runs already (then False). A cluster that
    stopped, or half stopped, is stopped and started afresh: etcd's data goes with it."""
    from fedkube.dev.cluster import ControlPlane

    work.mkdir(parents=True, exist_ok=True)
    found = DevCluster.load(work)
    if found is not None and found.running:
        return found, False
    if found is not None:
        say(f"a dev cluster in {work} had stopped (some of its components gone); "
            "starting it afresh")
        stop(work)
    for sub in ("etcd", "pki", "logs"):  # a new CA each start: the old data would not do
        shutil.rmtree(work / sub, ignore_errors=True)
    plane = ControlPlane(work)  # builds the binaries first if they are not cached
    say(f"starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok "
        f"(usually 10-40 s; logs in {work / 'logs'})")
    began = time.monotonic()
    try:
        plane.start()
    except BaseException:
        say(plane.logs())
        plane.stop()
        raise
    components = []
    for name, process in plane.processes.items():
        started = _start_time(process.pid)
        assert started is not None, name  # checked alive by start()
        components.append(Component(name, process.pid, started))
    cluster = DevCluster(work, plane.kubeconfig, plane.server, plane.bin_dir,
                         tuple(components))
    _link_tools(cluster.tools, plane.bin_dir)
    cluster.save()
    nodes = ", ".join(f"{n.name} ({n.gpus} GPUs)" if n.gpus else n.name for n in plane.nodes)
    say(f"the dev cluster is up at {plane.server} in {time.monotonic() - began:.0f} s, "
        f"with KWOK nodes {nodes} (they run no containers)")
    return cluster, True


def stop(work: Path, timeout: float = 15) -> list[str]:
    """SIGTERM to each component the state file names and still runs (the last started
    first), SIGKILL after timeout; the state file and links go. The names stopped."""
    found = DevCluster.load(work)
    if found is None:
        return []
    alive = [c for c in reversed(found.components) if c.running]
    for component in alive:
        os.kill(component.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(c.running for c in alive) and time.monotonic() < deadline:
        time.sleep(0.1)
    for component in alive:
        if component.running:
            os.kill(component.pid, signal.SIGKILL)
    (work / STATE).unlink(missing_ok=True)
    shutil.rmtree(found.tools, ignore_errors=True)
    return [c.name for c in alive]


def status_table(cluster: DevCluster) -> str:
    """One line per component, then the nodes as kubectl sees them."""
    import subprocess

    lines = [f"{'COMPONENT':<25} {'PID':>8}  STATE"]
    lines += [f"{c.name:<25} {c.pid:>8}  {'running' if c.running else 'gone'}"
              for c in cluster.components]
    lines.append(f"apiserver {cluster.server}, KUBECONFIG={cluster.kubeconfig}")
    if cluster.running:
        nodes = subprocess.run([str(cluster.bin_dir / "kubectl"),
                                f"--kubeconfig={cluster.kubeconfig}", "get", "nodes"],
                               capture_output=True, text=True, timeout=30)
        lines.append((nodes.stdout or nodes.stderr).rstrip())
    return "\n".join(lines) + "\n"
