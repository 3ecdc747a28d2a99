"""A real Kubernetes control plane on loopback, with fake GPU nodes, for tests and developers.

etcd, kube-apiserver (RBAC, service accounts, generated certificates), kube-controller-
manager, kube-scheduler and kwok run as processes from binaries that
`tools/k8s-testenv/build.sh` compiles (or from $KUBEBUILDER_ASSETS). KWOK marks the fake
nodes Ready and runs their pods' lifecycles without containers.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedkube.api.errors import ConfigError
from fedkube.dev.processes import free_port, spawn_logged, tail_logs, wait_for
from fedkube.transport import certs

REPO = Path(__file__).resolve().parents[2]  # the repository (fedkube/dev/cluster.py)
BUILD_SCRIPT = REPO / "tools" / "k8s-testenv" / "build.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl",
            "kwok")
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
SERVICE_CIDR = "10.0.0.0/24"  # ClusterIPs; a real node routes this range to a blackhole


@dataclass(frozen=True)
class FakeNode:
    name: str
    gpus: int = 0
    product: str = "NVIDIA-H100-80GB-HBM3"
    cpu: str = "32"
    memory: str = "256Gi"

    def manifest(self) -> dict[str, Any]:
        capacity = {"cpu": self.cpu, "memory": self.memory, "pods": "110"}
        labels = {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", "type": "kwok"}
        taints = []
        if self.gpus:
            capacity[GPU_RESOURCE] = str(self.gpus)
            labels |= {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": self.product,
                       "nvidia.com/gpu.count": str(self.gpus)}
            taints.append({"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"})
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name, "labels": labels,
                         "annotations": {KWOK_ANNOTATION: "fake",
                                         "node.alpha.kubernetes.io/ttl": "0"}},
            "spec": {"taints": taints},
            "status": {"capacity": capacity, "allocatable": capacity,
                       "nodeInfo": {"kubeletVersion": "fake", "architecture": "amd64",
                                    "operatingSystem": "linux"}},
        }


DEFAULT_NODES = (FakeNode("gpu-node-1", gpus=8), FakeNode("gpu-node-2", gpus=4,
                                                           product="NVIDIA-A100-SXM4-40GB"),
                 FakeNode("cpu-node-1"))


# What a cold build costs, said before it starts (measured on 2 busy cores).
BUILD_NOTICE = ("building the Kubernetes control plane (etcd, kwok, helm, kubectl, "
                "kube-apiserver, kube-controller-manager, kube-scheduler) from Go modules "
                "into ~/.cache/fedkube/k8s-testenv: once, about 15 minutes on 2 idle "
                "cores, up to 30 on busy ones; each step is logged below")


def binaries_dir() -> Path:
    """$KUBEBUILDER_ASSETS when it holds every binary, else the cached build (built if
    cold: then a line says what it is and how long it takes, and the build's own log of
    each step follows on stderr)."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and all((Path(assets) / name).exists() for name in BINARIES):
        return Path(assets)
    build = subprocess.Popen(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    try:  # a warm cache answers at once; anything longer is a build
        out, _ = build.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        print(f"[k8s-testenv] {BUILD_NOTICE}", file=sys.stderr, flush=True)
        out, _ = build.communicate()
    if build.returncode != 0:
        raise ConfigError(f"the Kubernetes binaries could not be built ({BUILD_SCRIPT} "
                          f"exited {build.returncode}, its error above); install Go, or set "
                          f"KUBEBUILDER_ASSETS to a directory holding {', '.join(BINARIES)}")
    return Path(out.strip().splitlines()[-1]) / "bin"


def kwok_stages(bin_dir: Path) -> list[Path]:
    stages = bin_dir.parent / "kwok-stages"
    return [stages / name for name in (
        "node/fast/node-initialize.yaml", "node/heartbeat/node-heartbeat.yaml",
        "pod/fast/pod-ready.yaml", "pod/fast/pod-complete.yaml", "pod/fast/pod-delete.yaml")]


def _kubeconfig(path: Path, server: str, ca: bytes, pair: certs.KeyPair | str) -> Path:
    """A kubeconfig for a client certificate, or a bearer token."""
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    user = ({"token": pair} if isinstance(pair, str) else
            {"client-certificate-data": b64(pair.cert_pem), "client-key-data": b64(pair.key_pem)})
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fedkube-test",
        "clusters": [{"name": "fedkube-test", "cluster": {
            "server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "fedkube-test",
                      "context": {"cluster": "fedkube-test", "user": "user"}}],
    }))
    return path


@dataclass
class ControlPlane:
    work: Path
    bin_dir: Path = field(default_factory=binaries_dir)
    nodes: tuple[FakeNode, ...] = DEFAULT_NODES
    # Where the apiserver listens and what it advertises: loopback for KWOK nodes; for a
    # real node (fedkube.dev.node) the node's bridge address, which its Pods can reach.
    # The `kubernetes` Service then gets that endpoint, and the apiserver reaches
    # kubelets by their InternalIP (a node's name does not resolve here).
    address: str = "127.0.0.1"
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    kubeconfig: Path = Path()
    server: str = ""
    ca: certs.KeyPair | None = None

    def _spawn(self, name: str, args: list[str]) -> None:
        self.processes[name] = spawn_logged(self.work / "logs", name,
                                            [str(self.bin_dir / name), *args])

    def logs(self, tail: int = 3000) -> str:
        return tail_logs(self.work / "logs", self.processes, tail)

    def start(self, timeout: float = 120) -> ControlPlane:
        for sub in ("logs", "pki", "etcd"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        pki = self.work / "pki"
        ca = self.ca = certs.create_ca("fedkube-test-ca")
        certs.write_pair(pki, "ca", ca)
        certs.write_pair(pki, "apiserver", certs.issue(
            ca, "kube-apiserver", hosts=sorted({
                "127.0.0.1", self.address, "localhost", "10.0.0.1", "kubernetes",
                "kubernetes.default", "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local"})))
        sa_key = ec.generate_private_key(ec.SECP256R1())
        (pki / "sa.key").write_bytes(sa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (pki / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self.server = f"https://{self.address}:{api_port}"
        real_node = self.address != "127.0.0.1"
        node_flags = (["--endpoint-reconciler-type=lease",
                       "--kubelet-preferred-address-types=InternalIP,Hostname",
                       "--authorization-mode=Node,RBAC"] if real_node else
                      ["--endpoint-reconciler-type=none", "--authorization-mode=RBAC"])
        self._spawn("etcd", [
            "--data-dir", str(self.work / "etcd"), "--unsafe-no-fsync",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer_port}",
            "--log-level", "warn"])
        self._spawn("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{etcd_port}", f"--secure-port={api_port}",
            f"--bind-address={self.address}", f"--advertise-address={self.address}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}", f"--cert-dir={pki}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", *node_flags,
            "--allow-privileged=true", "--enable-priority-and-fairness=false", "-v=1"])

        admin = certs.issue(ca, "fedkube-admin", organization="system:masters")
        self.kubeconfig = _kubeconfig(self.work / "kubeconfig", self.server, ca.cert_pem, admin)
        cm_config = _kubeconfig(self.work / "controller-manager.kubeconfig", self.server,
                                ca.cert_pem, certs.issue(ca, "system:kube-controller-manager"))
        sched_config = _kubeconfig(self.work / "scheduler.kubeconfig", self.server,
                                   ca.cert_pem, certs.issue(ca, "system:kube-scheduler"))
        self._wait_ready(ca.cert_pem, admin, timeout)
        self._spawn("kube-controller-manager", [
            f"--kubeconfig={cm_config}", f"--authentication-kubeconfig={cm_config}",
            f"--authorization-kubeconfig={cm_config}", "--leader-elect=false",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}", "--use-service-account-credentials=true",
            f"--secure-port={free_port()}", "--bind-address=127.0.0.1",
            "--controllers=*,-nodeipam,-cloud-node-lifecycle", "-v=1"])
        self._spawn("kube-scheduler", [
            f"--kubeconfig={sched_config}", f"--authentication-kubeconfig={sched_config}",
            f"--authorization-kubeconfig={sched_config}", "--leader-elect=false",
            f"--secure-port={free_port()}", "--bind-address=127.0.0.1", "-v=1"])
        self._spawn("kwok", [
            f"--kubeconfig={self.kubeconfig}", "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{free_port()}", "--node-ip=127.0.0.1",
            *[arg for stage in kwok_stages(self.bin_dir) for arg in ("-c", str(stage))]])
        if self.nodes:
            self.apply([node.manifest() for node in self.nodes])
        wait_for(self._nodes_ready, timeout=timeout, interval=0.5, message="fake nodes Ready")
        wait_for(self._default_service_account, timeout=timeout, interval=0.5,
                 message="the default service account")
        return self

    def _wait_ready(self, ca_pem: bytes, admin: certs.KeyPair, timeout: float) -> None:
        context = ssl.create_default_context(cadata=ca_pem.decode())
        cert, key = self.work / "pki" / "admin.crt", self.work / "pki" / "admin.key"
        cert.write_bytes(admin.cert_pem)
        key.write_bytes(admin.key_pem)
        context.load_cert_chain(cert, key)

        def ready() -> bool:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", context=context,
                                            timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_for(ready, timeout=timeout, interval=0.2, message="kube-apiserver /readyz")

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}\n{self.logs()}")

    def kubectl(self, *args: str, input: str | None = None, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}",
                               *args], input=input, capture_output=True, text=True, check=check,
                              timeout=120)

    def can_i(self, verb: str, resource: str, *, user: str, namespace: str) -> bool:
        """`kubectl auth can-i` as user; resource may carry flags ("pods
        --subresource=log") and its own "-n NAMESPACE", which then wins. Certificate
        signers ("signers.certificates.k8s.io/NAME"), which discovery does not list, are
        asked with a SubjectAccessReview."""
        signers = "signers.certificates.k8s.io/"
        if resource.startswith(signers):
            return self._review(verb, "certificates.k8s.io", "signers",
                                resource.removeprefix(signers), user=user)
        args = resource.split()
        where = [] if "-n" in args else ["-n", namespace]
        result = self.kubectl("auth", "can-i", verb, *args, *where, "--as", user, check=False)
        if result.stdout.strip() not in ("yes", "no"):
            raise RuntimeError(f"kubectl auth can-i {verb} {resource}: {result.stderr}")
        return result.stdout.strip() == "yes"

    def _review(self, verb: str, group: str, resource: str, name: str, *, user: str) -> bool:
        groups = ["system:authenticated"]
        if user.startswith("system:serviceaccount:"):  # what impersonation would add
            groups += ["system:serviceaccounts",
                       f"system:serviceaccounts:{user.split(':')[2]}"]
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                  "spec": {"user": user, "groups": groups, "resourceAttributes": {
                      "group": group, "resource": resource, "verb": verb, "name": name}}}
        answer = json.loads(self.kubectl("create", "-o", "json", "-f", "-",
                                         input=json.dumps(review)).stdout)
        return bool(answer["status"].get("allowed"))

    def pod_kubeconfig(self, path: Path, namespace: str, account: str,
                       pod: str | None = None) -> Path:
        """A kubeconfig holding the token `account` would have in `pod` (bound to it, so
        the apiserver knows its node), or an unbound token: what a process in that Pod
        sees, for Pods on KWOK nodes that run no containers."""
        bound = ["--bound-object-kind", "Pod", "--bound-object-name", pod] if pod else []
        token = self.kubectl("-n", namespace, "create", "token", account, *bound).stdout.strip()
        return _kubeconfig(path, self.server, (self.work / "pki" / "ca.crt").read_bytes(), token)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin_dir / "helm"), f"--kubeconfig={self.kubeconfig}",
                               *args], capture_output=True, text=True, check=check, timeout=300)

    def apply(self, manifests: list[dict[str, Any]]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(manifests))

    def _nodes_ready(self) -> bool:
        self._check_alive()
        out = self.kubectl("get", "nodes", "-o",
                           "jsonpath={range .items[*]}{.metadata.name}={.status.conditions"
                           "[?(@.type=='Ready')].status} {end}", check=False).stdout
        states = dict(item.split("=", 1) for item in out.split())
        return all(states.get(node.name) == "True" for node in self.nodes)

    def _default_service_account(self) -> bool:
        return self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def clean(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
