"""A real Kubernetes node on this machine, joined to a test control plane (fedkube.dev.cluster),
for the tests that run fedkube in containers.

containerd (its own root, state and socket), a bridge for the Pods' addresses with the CNI
plugins, a kubelet, kube-proxy and CoreDNS, all as processes of this one (root). The node is
labelled as a GPU node and advertises `nvidia.com/gpu` capacity without a device plugin
(patched into its status), so GPU-scheduled Pods land on it; the envoy's NVML monitor then
finds no driver and reports no devices.

No test packet leaves the machine: every address is loopback, the bridge or a Pod's own
network namespace. The Service range is routed to a blackhole, so a ClusterIP without
endpoints is dropped here instead of following the default route; kube-proxy's rules
still send the live ones to their Pods first.

`stop()` restores every host change that starting made: the sysctls the kubelet and
kube-proxy set, the iptables rules (saved and restored whole), mounts, the bridge and the
routes, and kills whatever the Pods left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedkube.api.resources import DEFAULT_IMAGE
from fedkube.dev.cluster import GPU_RESOURCE, REPO, SERVICE_CIDR, ControlPlane, _kubeconfig
from fedkube.dev.processes import free_port, spawn_logged, tail_logs, wait_for
from fedkube.transport import certs

NODE_BUILD_SCRIPT = REPO / "tools" / "k8s-testenv" / "build-node.sh"
IMAGE_BUILD_SCRIPT = REPO / "tools" / "image" / "build.sh"
HOST_PACKAGES_SCRIPT = REPO / "tools" / "k8s-testenv" / "host-packages.sh"
# The name of deploy/shard.yaml's first shard's node: the quick start runs as written.
NODE_NAME = "gpu-node-1"
BRIDGE = "fedkube0"
POD_CIDR = "10.88.0.0/24"
NODE_IP = "10.88.0.1"  # the bridge's own address: the node's IP and the Pods' gateway
CLUSTER_DOMAIN = "cluster.local"
PAUSE_IMAGE = "localhost/fedkube/pause:3.10"
BUILT_IMAGE = "localhost/fedkube:dev"  # as tools/image/build.sh tags it
FEDKUBE_IMAGE = f"docker.io/library/{DEFAULT_IMAGE}"  # what Pods name by default
CNI_BIN = Path("/usr/lib/cni")
# What the kubelet and kube-proxy may change, put back at stop().
SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops",
           "net/ipv4/ip_forward", "net/ipv4/conf/all/route_localnet",
           "net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables",
           "net/netfilter/nf_conntrack_tcp_timeout_established",
           "net/netfilter/nf_conntrack_tcp_timeout_close_wait", "net/netfilter/nf_conntrack_max")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _run(*args: str, check: bool = True, input: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check,
                          input=input, timeout=300)


def _script_output(script: Path) -> str:
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                            timeout=3600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{result.stderr[-4000:]}")
    return result.stdout


def node_binaries() -> Path:
    """kubelet, kube-proxy and coredns, built and cached by tools/k8s-testenv/build-node.sh."""
    return Path(_script_output(NODE_BUILD_SCRIPT).strip().splitlines()[-1]) / "bin"


def node_images() -> dict[str, Path]:
    """The pause and fedkube image archives, built and cached by tools/image/build.sh."""
    images = {}
    for line in _script_output(IMAGE_BUILD_SCRIPT).splitlines():
        name, sep, path = line.partition("=")
        if sep:
            images[name.strip()] = Path(path.strip())
    return images


def _tables(saved: str) -> set[str]:
    return {line[1:].strip() for line in saved.splitlines() if line.startswith("*")}


def _mountpoints() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


@dataclass
class HostChanges:
    """What the node changes on this machine, recorded first so that stop() undoes it."""

    sysctls: dict[str, str] = field(default_factory=dict)
    iptables: str = ""
    ip6tables: str = ""
    mounts: set[str] = field(default_factory=set)
    netns_existed: bool = True
    routes: list[list[str]] = field(default_factory=list)
    bridge: bool = False
    work: Path = Path("/nonexistent")  # the node's directory: mounts under it are its own

    @classmethod
    def record(cls, work: Path) -> HostChanges:
        changes = cls(mounts=set(_mountpoints()), netns_existed=Path("/run/netns").exists(),
                      work=work)
        for name in SYSCTLS:
            path = Path("/proc/sys") / name
            if path.exists():
                changes.sysctls[name] = path.read_text().strip()
        changes.iptables = _run("iptables-save").stdout
        changes.ip6tables = _run("ip6tables-save", check=False).stdout
        return changes

    def restore(self) -> list[str]:
        """Undoes each change; returns what could not be undone (for the test to report)."""
        problems = []
        # Only the node's own mounts (its work dir: kubelet volumes, containerd's
        # snapshots; and network namespaces): other programs' mounts are theirs.
        ours = [mount for mount in set(_mountpoints()) - self.mounts
                if mount.startswith((f"{self.work}/", "/run/netns"))]
        for mount in sorted(ours, key=len, reverse=True):
            result = _run("umount", "-l", mount, check=False)
            if result.returncode != 0 and mount in _mountpoints():
                problems.append(f"umount {mount}: {result.stderr.strip()}")
        if not self.netns_existed:
            with contextlib.suppress(OSError):
                Path("/run/netns").rmdir()
        for route in reversed(self.routes):
            _run("ip", "route", "del", *route, check=False)
        if self.bridge:
            _run("ip", "link", "del", BRIDGE, check=False)
        for saved, command in ((self.iptables, "iptables"), (self.ip6tables, "ip6tables")):
            # iptables-restore resets only the tables it is given: a table that did not
            # exist before (the kubelet's and kube-proxy's nat and mangle chains) is given
            # empty, which flushes it and deletes its chains.
            now = _run(f"{command}-save", check=False).stdout
            missing = _tables(now) - _tables(saved)
            restored = saved + "".join(f"*{table}\nCOMMIT\n" for table in sorted(missing))
            if restored and _run(f"{command}-restore", input=restored,
                                 check=False).returncode != 0:
                problems.append(f"{command}-restore failed")
            if _tables(saved) and _run(f"{command}-save", check=False).stdout.count(
                    "KUBE-") > saved.count("KUBE-"):
                problems.append(f"{command}: KUBE- chains left")
        for name, value in self.sysctls.items():
            path = Path("/proc/sys") / name
            try:
                if path.read_text().strip() != value:
                    path.write_text(value)
            except OSError as exc:
                problems.append(f"sysctl {name}: {exc}")
        return problems


@dataclass
class RealNode:
    """A kubelet node joined to `plane`, whose address must be NODE_IP (the bridge's)."""

    work: Path
    plane: ControlPlane
    bin_dir: Path
    images: dict[str, Path]
    gpus: int = 2
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    changes: HostChanges | None = None

    @property
    def socket(self) -> Path:
        return self.work / "containerd" / "containerd.sock"

    # -- the bridge: the node's address, before the control plane starts ----------------

    @classmethod
    def prepare_host(cls, work: Path) -> HostChanges:
        """Records the host, then makes the bridge (whose address the apiserver binds) and
        the blackhole routes. Call before the control plane starts."""
        if os.geteuid() != 0:
            raise RuntimeError("a real node needs root")
        changes = HostChanges.record(work)
        if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
            _run("ip", "link", "add", BRIDGE, "type", "bridge")
            changes.bridge = True
            _run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
            _run("ip", "link", "set", BRIDGE, "up")
        for route in (["blackhole", SERVICE_CIDR],):
            if _run("ip", "route", "add", *route, check=False).returncode == 0:
                changes.routes.append(route)
        return changes

    def _spawn(self, name: str, args: list[str]) -> None:
        self.processes[name] = spawn_logged(self.work / "logs", name, args)

    def logs(self, tail: int = 3000) -> str:
        return tail_logs(self.work / "logs", self.processes, tail)

    def diagnostics(self) -> str:
        """What a failed test prints: every Pod, recent events, and every container's logs
        (the previous run's too, for a container that restarted)."""
        kubectl = self.plane.kubectl
        parts = [kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout,
                 kubectl("get", "events", "-A", "--sort-by=.lastTimestamp",
                         check=False).stdout[-6000:]]
        pods = kubectl("get", "pods", "-A", "-o", "jsonpath={range .items[*]}"
                       "{.metadata.namespace}/{.metadata.name} {end}", check=False).stdout
        for item in pods.split():
            namespace, name = item.split("/", 1)
            for previous in ("--previous=true", "--previous=false"):
                logs = kubectl("-n", namespace, "logs", name, "--all-containers", previous,
                               "--tail=60", check=False)
                if logs.stdout.strip():
                    parts.append(f"----- logs {item} {previous} -----\n{logs.stdout}")
        return "\n".join(parts)

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}\n{self.logs()}")

    # -- start ----------------------------------------------------------------------------

    def start(self, timeout: float = 180) -> RealNode:
        for sub in ("logs", "containerd", "cni", "kubelet", "pki"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        self._start_containerd()
        self._import_images()
        self._start_coredns()
        self._start_kubelet()
        self._start_kube_proxy()
        wait_for(self._ready, timeout=timeout, interval=0.5, message=f"node {NODE_NAME} Ready")
        self.plane.kubectl("label", "node", NODE_NAME, "--overwrite",
                           "nvidia.com/gpu.present=true", f"nvidia.com/gpu.count={self.gpus}")
        # No device plugin: the capacity is patched in, as Kubernetes documents for
        # extended resources; the kubelet keeps what it does not manage itself.
        self.plane.kubectl("patch", "node", NODE_NAME, "--subresource=status", "--type=json",
                           "-p", json.dumps([{"op": "add", "path": "/status/capacity/"
                                              + GPU_RESOURCE.replace("/", "~1"),
                                              "value": str(self.gpus)}]))
        wait_for(self._gpus_allocatable, timeout=60, interval=0.5,
                 message=f"{GPU_RESOURCE} allocatable on {NODE_NAME}")
        return self

    def _start_containerd(self) -> None:
        root = self.work / "containerd"
        config = root / "config.toml"
        cni_conf = self.work / "cni"
        config.write_text(f"""version = 2
root = "{root / 'root'}"
state = "{root / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This VM has no CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below its own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{cni_conf}"
""")
        (cni_conf / "10-fedkube.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "fedkube", "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "hairpinMode": True,
                 # No masquerade: nothing is meant to leave the machine.
                 "ipMasq": False,
                 # Pods get a route to the Service range and nothing wider (no default
                 # route): an address outside the cluster is unreachable from a Pod.
                 "ipam": {"type": "host-local", "ranges": [[{
                     "subnet": POD_CIDR, "gateway": NODE_IP, "rangeStart": "10.88.0.10"}]],
                     "routes": [{"dst": SERVICE_CIDR, "gw": NODE_IP}],
                     "dataDir": str(self.work / "cni" / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}, indent=2))
        self._spawn("containerd", ["containerd", "--config", str(config)])
        def answers() -> bool:
            self._check_alive()
            return self._ctr("version", check=False).returncode == 0

        wait_for(answers, timeout=30, interval=0.1, message="containerd")

    def _ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ctr", "--address", str(self.socket), "-n", "k8s.io", *args, check=check)

    def _import_images(self) -> None:
        for archive in self.images.values():
            self._ctr("images", "import", str(archive))
        # The name a Federation's Pods and the chart use by default (fedkube:0.1.0).
        self._ctr("images", "tag", "--force", BUILT_IMAGE, FEDKUBE_IMAGE)

    def _start_coredns(self) -> None:
        """Cluster DNS on the bridge address, answering only for the cluster's names (no
        upstream: a name outside the cluster gets no answer rather than a query out)."""
        corefile = self.work / "Corefile"
        corefile.write_text(f""".:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{free_port()}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {self.plane.kubeconfig} fedkube-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
""")
        self._spawn("coredns", [str(self.bin_dir / "coredns"), "-conf", str(corefile)])

    def _start_kubelet(self) -> None:
        assert self.plane.ca is not None
        pki = self.work / "pki"
        kubeconfig = _kubeconfig(pki / "kubelet.kubeconfig", self.plane.server,
                                 self.plane.ca.cert_pem,
                                 certs.issue(self.plane.ca, f"system:node:{NODE_NAME}",
                                             organization="system:nodes"))
        resolv = self.work / "resolv.conf"
        resolv.write_text("")  # the Pods' resolver is cluster DNS alone
        config = self.work / "kubelet" / "config.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "address": NODE_IP, "port": free_port(), "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            # Test only: the apiserver calls the kubelet (logs) without a client certificate.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "clusterDNS": [NODE_IP], "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(resolv),
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False, "registerNode": True,
            "nodeStatusUpdateFrequency": "2s", "syncFrequency": "5s",
        }))
        self._spawn("kubelet", [
            str(self.bin_dir / "kubelet"), f"--config={config}", f"--kubeconfig={kubeconfig}",
            f"--root-dir={self.work / 'kubelet' / 'root'}",
            f"--cert-dir={self.work / 'kubelet' / 'pki'}", f"--node-ip={NODE_IP}",
            f"--hostname-override={NODE_NAME}", "--v=1"])

    def _start_kube_proxy(self) -> None:
        assert self.plane.ca is not None
        kubeconfig = _kubeconfig(self.work / "pki" / "kube-proxy.kubeconfig", self.plane.server,
                                 self.plane.ca.cert_pem,
                                 certs.issue(self.plane.ca, "system:kube-proxy"))
        config = self.work / "kube-proxy.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration", "mode": "iptables",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": NODE_NAME, "clusterCIDR": POD_CIDR,
            "bindAddress": NODE_IP, "nodePortAddresses": [f"{NODE_IP}/32"],
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "iptables": {"localhostNodePorts": False},
            # Zero: leave the host's conntrack settings as they are.
            "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
        }))
        self._spawn("kube-proxy", [str(self.bin_dir / "kube-proxy"), f"--config={config}",
                                   "--v=1"])

    def _ready(self) -> bool:
        self._check_alive()
        out = self.plane.kubectl("get", "node", NODE_NAME, "-o", "jsonpath={.status.conditions"
                                 "[?(@.type=='Ready')].status}", check=False).stdout
        return out.strip() == "True"

    def _gpus_allocatable(self) -> bool:
        node = json.loads(self.plane.kubectl("get", "node", NODE_NAME, "-o", "json").stdout)
        return bool(node["status"].get("allocatable", {}).get(GPU_RESOURCE) == str(self.gpus))

    def local_volume(self, namespace: str, claim: str, size: str = "1Gi") -> dict[str, Any]:
        """A PersistentVolume on this node for one claim (the node has no provisioner):
        a directory that any uid may write, since a hostPath volume keeps the host's
        owner (fedkube's Pods run as 10001)."""
        path = self.work / "volumes" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        return {"apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": f"{namespace}-{claim}"},
                "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
                         "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                         "claimRef": {"namespace": namespace, "name": claim},
                         "hostPath": {"path": str(path), "type": "Directory"},
                         "nodeAffinity": {"required": {"nodeSelectorTerms": [{
                             "matchExpressions": [{"key": "kubernetes.io/hostname",
                                                   "operator": "In",
                                                   "values": [NODE_NAME]}]}]}}}}

    # -- stop -----------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Stops every process and kills what the Pods left; returns what it could not
        clean (host changes are undone by HostChanges.restore, after the control plane)."""
        for name in ("kube-proxy", "kubelet", "coredns"):
            process = self.processes.get(name)
            if process is not None and process.poll() is None:
                process.terminate()
        for name in ("kube-proxy", "kubelet", "coredns"):
            self._wait(name)
        problems = self._kill_pods()
        containerd = self.processes.get("containerd")
        if containerd is not None and containerd.poll() is None:
            containerd.terminate()
            self._wait("containerd")
        for shim in _processes_matching("containerd-shim", str(self.work)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(shim, signal.SIGKILL)
        return problems

    def _wait(self, name: str) -> None:
        process = self.processes.get(name)
        if process is None:
            return
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _kill_pods(self) -> list[str]:
        """SIGKILL to every process in the Pods' cgroups, then the cgroups removed. The
        tree changes as it is read (runc removes a container's own), so it is walked with
        os.walk, which skips what vanished."""
        problems = []
        for controller in sorted(CGROUP_ROOT.iterdir()):
            top = controller / "kubepods"
            if not top.is_dir():
                continue

            def killed_all(top: Path = top) -> bool:  # a dying process may still fork
                pids = []
                for directory, _, files in os.walk(top):
                    if "cgroup.procs" in files:
                        with contextlib.suppress(OSError):
                            pids += [int(pid) for pid in
                                     Path(directory, "cgroup.procs").read_text().split()]
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                return not pids

            try:
                wait_for(killed_all, timeout=30, interval=0.1, message="the Pods' processes gone")
            except TimeoutError as exc:
                problems.append(str(exc))
            for directory, _, _ in os.walk(top, topdown=False):  # the deepest first
                try:
                    Path(directory).rmdir()
                except FileNotFoundError:  # removed meanwhile
                    pass
                except OSError as exc:
                    problems.append(f"cgroup {directory}: {exc}")
        return problems

    def clean(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def _processes_matching(*needles: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if all(needle in command for needle in needles):
            found.append(int(entry.name))
    return found


def pod_manifest(name: str, image: str, command: list[str], **spec: Any) -> dict[str, Any]:
    """A restricted-profile Pod on the real node (for smoke tests)."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
        "nodeName": NODE_NAME, "restartPolicy": "Never",
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": name, "image": image, "imagePullPolicy": "Never",
                        "command": command, "securityContext": {
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}}}],
        **spec}}
