"""Per-shard certificates on Kubernetes: under mTLS each envoy (and collaborator Pod)
requests a certificate for its own shard with a CertificateSigningRequest, and the operator
signs it only when the Pod's token says it runs on the shard's node.

The envoys run as local processes (KWOK nodes run no containers) holding exactly what
their DaemonSet Pod would hold: the rendered envoy config, the CA from the ConfigMap and a
service-account token bound to the envoy Pod that the DaemonSet put on that node.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID
from kubernetes import config as kube_config

from fedkube.dev.cluster import ControlPlane
from fedkube.dev.processes import Process, director_process, free_port, wait_for
from fedkube.envoy_agent.pods import PodPlacement, build_collaborator_pod
from fedkube.envoy_agent.runtime import CollaboratorJob
from fedkube.kube.csr import CertificateRefused, request_certificate
from tests.helpers import restricted_namespace

pytestmark = pytest.mark.k8s
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "fedkube"
NAMESPACE = "fl-certs"
FEDERATION = "sealed"
SHARDS = {"ward-a": "gpu-node-1", "ward-b": "gpu-node-2"}


@dataclass
class Sealed:
    cluster: ControlPlane
    work: Path
    director_port: int
    processes: list[Process] = field(default_factory=list)

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl("-n", NAMESPACE, *args, check=check)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def envoy_pod(self, node: str) -> str:
        pods = self.get("pods", "-l", f"fedkube.io/federation={FEDERATION},"
                        "app.kubernetes.io/component=envoy")["items"]
        return next((str(p["metadata"]["name"]) for p in pods
                     if p["spec"].get("nodeName") == node), "")

    def kubeconfig(self, name: str, account: str, pod: str | None) -> Path:
        return self.cluster.pod_kubeconfig(self.work / f"{name}.kubeconfig", NAMESPACE,
                                           account, pod)

    def envoy(self, shard: str, *, on_node: str, tls: dict[str, Any] | None = None,
              tag: str = "") -> tuple[Process, Path]:
        """An envoy of `shard` started as the envoy Pod on `on_node` would be (with `tls`
        settings added to its config), and the directory it keeps its key and
        certificate in."""
        name = f"{shard}-on-{on_node}{tag}"
        config = yaml.safe_load(self.get("configmap", f"{FEDERATION}-envoy-config")[
            "data"][f"{SHARDS[shard]}.yaml"])
        tls_dir = self.work / name / "tls"
        config.update(director=f"127.0.0.1:{self.director_port}", runtime="process",
                      work_dir=str(self.work / name / "work"))
        config.pop("pod")
        config["tls"].update(ca=str(self.work / "ca.crt"), cert=str(tls_dir / "tls.crt"),
                             key=str(tls_dir / "tls.key"), **(tls or {}))
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        kubeconfig = self.kubeconfig(name, f"{FEDERATION}-envoy", self.envoy_pod(on_node))
        process = Process(name, ["envoy", "start", "--config", str(path)],
                          self.work / "logs" / f"{name}.log",
                          env={"KUBECONFIG": str(kubeconfig)}).start()
        self.processes.append(process)
        return process, tls_dir


def _manifests(director_port: int) -> list[dict[str, Any]]:
    federation = {"apiVersion": "fedkube.io/v1alpha1", "kind": "Federation",
                  "metadata": {"name": FEDERATION},
                  "spec": {"sampleShape": ["8", "8"], "targetShape": ["1"], "tls": "mtls",
                           "healthCheckPeriodSeconds": 1,
                           "directorEndpoint": f"127.0.0.1:{director_port}"}}
    shards = [{"apiVersion": "fedkube.io/v1alpha1", "kind": "Shard",
               "metadata": {"name": shard},
               "spec": {"federation": FEDERATION, "nodeName": node, "loader": "digits",
                        "options": {"index": str(index), "count": "2"}}}
              for index, (shard, node) in enumerate(SHARDS.items())]
    return [federation, *shards]


@pytest.fixture(scope="module")
def sealed(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Sealed]:
    work = tmp_path_factory.mktemp("sealed")
    restricted_namespace(cluster, NAMESPACE)
    # The chart's binding that lets this namespace's accounts file requests.
    cluster.kubectl("apply", "-f", "-", input=cluster.helm(
        "template", "certs", str(CHART), "--namespace", "fedkube-system",
        "--show-only", "templates/certificates.yaml",
        "--set", f"operator.watchNamespaces={{{NAMESPACE}}}").stdout)
    sealed = Sealed(cluster, work, free_port())
    sealed.processes.append(Process(
        "operator", ["operator", "run", "--namespace", NAMESPACE],
        work / "logs" / "operator.log", env={"KUBECONFIG": str(cluster.kubeconfig)}).start())
    try:
        cluster.kubectl("-n", NAMESPACE, "apply", "-f", "-",
                        input=yaml.safe_dump_all(_manifests(sealed.director_port)))
        wait_for(lambda: sealed.kubectl("get", "secret", f"{FEDERATION}-director-tls",
                                        check=False).returncode == 0
                 and sealed.kubectl("get", "configmap", f"{FEDERATION}-ca-bundle",
                                    check=False).returncode == 0,
                 timeout=60, message="director certificate and CA bundle")
        wait_for(lambda: len(sealed.get("configmap", f"{FEDERATION}-envoy-config").get(
            "data") or {}) == len(SHARDS), timeout=60, message="envoy config of both nodes")
        wait_for(lambda: all(sealed.envoy_pod(node) for node in SHARDS.values()),
                 timeout=60, message="an envoy Pod on each GPU node")
        # The director runs locally with the certificate the operator issued for it.
        pki = work / "pki"
        pki.mkdir()
        secret = sealed.get("secret", f"{FEDERATION}-director-tls")["data"]
        for name, key in (("ca.crt", "ca.crt"), ("director.crt", "tls.crt"),
                          ("director.key", "tls.key")):
            (pki / name).write_bytes(base64.b64decode(secret[key]))
        (work / "ca.crt").write_text(
            sealed.get("configmap", f"{FEDERATION}-ca-bundle")["data"]["ca.crt"])
        sealed.processes.append(director_process(work, sealed.director_port, period=1.0,
                                                 cert_dir=pki).start())
        yield sealed
    finally:
        for process in reversed(sealed.processes):
            process.stop()


def _api(kubeconfig: Path) -> Any:
    return kube_config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]


def _subject(pem: bytes) -> dict[str, str]:
    cert = x509.load_pem_x509_certificate(pem)
    return {"CN": str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value),
            "OU": str(cert.subject.get_attributes_for_oid(
                NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value),
            "issuer": cert.issuer.rfc4514_string()}


def test_envoys_get_their_own_shard_certificate_and_run_an_experiment(sealed: Sealed
                                                                      ) -> None:
    tls_dirs = {shard: sealed.envoy(shard, on_node=node)[1] for shard, node in SHARDS.items()}

    def online() -> bool:
        items = sealed.get("shards")["items"]
        return len(items) == 2 and all(s.get("status", {}).get("online") for s in items)

    wait_for(online, timeout=90, message="both shards registered under mTLS")
    for shard in SHARDS:
        requests = json.loads(sealed.cluster.kubectl(
            "get", "csr", "-l", f"fedkube.io/shard={shard}", "-o", "json").stdout)["items"]
        approved = [r for r in requests if any(
            c["type"] == "Approved" and c["reason"] == "ShardNodeVerified"
            for c in r["status"].get("conditions", []))]
        assert len(approved) == 1, requests
        pem = base64.b64decode(approved[0]["status"]["certificate"])
        assert _subject(pem) == {"CN": shard, "OU": "envoy", "issuer": f"CN={FEDERATION}-ca"}
        assert (tls_dirs[shard] / "tls.crt").read_bytes() == pem
        # The private key stayed with its envoy: no Secret of the namespace holds it.
        key = (tls_dirs[shard] / "tls.key").read_text()
        assert key.splitlines()[1] not in sealed.kubectl("get", "secrets", "-o", "yaml").stdout
    # No certificate shared by all envoys exists any more.
    assert sealed.kubectl("get", "secret", f"{FEDERATION}-envoy-tls",
                          check=False).returncode != 0

    experiment = {"apiVersion": "fedkube.io/v1alpha1", "kind": "Experiment",
                  "metadata": {"name": "sealed-logreg"},
                  "spec": {"federation": FEDERATION, "task": "digits-logreg", "rounds": 3,
                           "params": {"learning_rate": 1.0}, "shards": list(SHARDS),
                           "minCollaborators": 2, "roundTimeoutSeconds": 120}}
    sealed.cluster.kubectl("-n", NAMESPACE, "apply", "-f", "-",
                           input=yaml.safe_dump(experiment))
    sealed.kubectl("wait", "--for=condition=Succeeded", "experiment/sealed-logreg",
                   "--timeout=120s")
    assert sealed.get("experiment", "sealed-logreg")["status"]["bestMetric"] > 0.8


def _approved(sealed: Sealed, shard: str) -> list[dict[str, Any]]:
    requests = json.loads(sealed.cluster.kubectl(
        "get", "csr", "-l", f"fedkube.io/shard={shard}", "-o", "json").stdout)["items"]
    return [r for r in requests if r["status"].get("certificate") and any(
        c["type"] == "Approved" for c in r["status"].get("conditions", []))]


def test_an_envoy_renews_its_certificate_before_it_expires(sealed: Sealed) -> None:
    """The shortest lifetime a CSR may ask for (10 minutes), renewed 597 s before expiry:
    a new request every few seconds, each signed by the operator, and the envoy carries
    on with the newest certificate."""
    for process in sealed.processes:  # ward-a's first envoy steps aside
        if process.name == "ward-a-on-gpu-node-1":
            process.stop()
    before = {r["metadata"]["name"] for r in _approved(sealed, "ward-a")}
    envoy, tls_dir = sealed.envoy("ward-a", on_node="gpu-node-1", tag="-renewing",
                                  tls={"certificate_lifetime_s": 600, "renew_before_s": 597})
    try:
        wait_for(lambda: envoy.output().count("renewed; reconnected") >= 2, timeout=90,
                 message="two renewals")
        assert envoy.running, envoy.output()[-3000:]
        fresh = [r for r in _approved(sealed, "ward-a") if r["metadata"]["name"] not in before]
        assert len(fresh) >= 3, fresh  # the request at start and two renewals
        assert all(r["spec"]["expirationSeconds"] == 600 for r in fresh)
        issued = {base64.b64decode(r["status"]["certificate"]) for r in fresh}
        current = (tls_dir / "tls.crt").read_bytes()
        assert current in issued
        cert = x509.load_pem_x509_certificate(current)
        assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(
            seconds=600 + 300)  # backdated by at most 5 minutes for clock skew
        assert _subject(current) == {"CN": "ward-a", "OU": "envoy",
                                     "issuer": f"CN={FEDERATION}-ca"}
        assert "could not renew" not in envoy.output()
    finally:
        envoy.stop()


def test_envoy_on_another_node_is_denied_with_the_reason(sealed: Sealed) -> None:
    """The envoy Pod of gpu-node-1 cannot obtain ward-b's identity (ward-b is on node 2)."""
    impostor, tls_dir = sealed.envoy("ward-b", on_node="gpu-node-1")
    assert impostor.wait(timeout=60) == 3
    output = impostor.output()
    assert "denied" in output and "WrongNode" in output and "gpu-node-2" in output
    assert not (tls_dir / "tls.crt").exists()


@pytest.mark.parametrize(("account", "bound", "role", "reason"), [
    ("sealed-envoy", False, "envoy", "NotBoundToPod"),         # token from outside a Pod
    ("default", False, "envoy", "UnknownRequester"),           # not the federation's account
    ("sealed-collaborator", True, "envoy", "WrongRole"),       # a collaborator posing as envoy
])
def test_requests_without_the_right_account_pod_or_role_are_denied(
        sealed: Sealed, account: str, bound: bool, role: str, reason: str) -> None:
    pod = _collaborator_pod(sealed) if bound else None
    kubeconfig = sealed.kubeconfig(f"{account}-{reason}", account, pod)
    with pytest.raises(CertificateRefused, match=reason):
        request_certificate("ward-a", role, cert_path=sealed.work / reason / "tls.crt",
                            key_path=sealed.work / reason / "tls.key", timeout=60,
                            api_client=_api(kubeconfig))
    assert not (sealed.work / reason / "tls.key").exists()


def _collaborator_pod(sealed: Sealed) -> str:
    """The collaborator Pod an envoy's pod runtime makes for ward-a (admitted under Pod
    Security `restricted`), placed by the scheduler on ward-a's node."""
    job = CollaboratorJob(experiment="fl-certs.probe", collaborator="ward-a",
                          archive=sealed.work, work_dir=sealed.work, cuda_devices=(), gpus=0)
    where = PodPlacement(namespace=NAMESPACE, node_name=SHARDS["ward-a"], image="fedkube:test",
                         director=f"127.0.0.1:{sealed.director_port}", loader="digits",
                         options={}, ca_config_map=f"{FEDERATION}-ca-bundle",
                         certificate_account=f"{FEDERATION}-collaborator")
    manifest = build_collaborator_pod(job, where)
    name = str(manifest["metadata"]["name"])
    if sealed.kubectl("get", "pod", name, check=False).returncode != 0:
        sealed.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    wait_for(lambda: sealed.get("pod", name)["spec"].get("nodeName") == SHARDS["ward-a"],
             timeout=60, message="collaborator Pod scheduled on ward-a's node")
    return name


def test_collaborator_pod_gets_a_collaborator_certificate(sealed: Sealed) -> None:
    kubeconfig = sealed.kubeconfig("collaborator", f"{FEDERATION}-collaborator",
                                   _collaborator_pod(sealed))
    cert, key = sealed.work / "collab" / "tls.crt", sealed.work / "collab" / "tls.key"
    request_certificate("ward-a", "collaborator", cert_path=cert, key_path=key, timeout=60,
                        api_client=_api(kubeconfig))
    assert _subject(cert.read_bytes())["OU"] == "collaborator"
    assert key.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("account", "verb", "resource", "allowed"), [
    ("sealed-envoy", "create", "certificatesigningrequests.certificates.k8s.io", True),
    ("sealed-envoy", "watch", "certificatesigningrequests.certificates.k8s.io", True),
    ("sealed-envoy", "update",
     "certificatesigningrequests.certificates.k8s.io --subresource=approval", False),
    ("sealed-envoy", "update",
     "certificatesigningrequests.certificates.k8s.io --subresource=status", False),
    ("sealed-envoy", "approve", "signers.certificates.k8s.io/fedkube.io/shard", False),
    ("sealed-envoy", "sign", "signers.certificates.k8s.io/fedkube.io/shard", False),
    ("sealed-collaborator", "create", "certificatesigningrequests.certificates.k8s.io", True),
    ("sealed-collaborator", "create", "pods", False),
    ("sealed-collaborator", "get", "secrets", False),
    ("sealed-collaborator", "get", "configmaps", False),
])
def test_requesters_can_ask_but_never_approve(sealed: Sealed, account: str, verb: str,
                                              resource: str, allowed: bool) -> None:
    user = f"system:serviceaccount:{NAMESPACE}:{account}"
    assert sealed.cluster.can_i(verb, resource, user=user, namespace=NAMESPACE) is allowed
