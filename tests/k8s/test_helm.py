"""The Helm chart: lint, template, and an install on the real control plane whose operator
Deployment becomes Available, with RBAC no wider than the operator needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fedkube.dev.cluster import ControlPlane

pytestmark = pytest.mark.k8s
CHART = Path(__file__).resolve().parents[2] / "charts" / "fedkube"
RELEASE, NAMESPACE = "fl", "fedkube-system"
OPERATOR = f"system:serviceaccount:{NAMESPACE}:{RELEASE}-operator"


def test_chart_lints_and_renders(cluster: ControlPlane) -> None:
    lint = cluster.helm("lint", str(CHART), "--strict", check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "0 chart(s) failed" in lint.stdout
    rendered = cluster.helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                            "--set", "federation.enabled=true",
                            "--set", "operator.watchNamespaces={team-a}").stdout
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered) if d}
    assert set(docs) == {("ServiceAccount", "fl-operator"), ("ClusterRole", "fl-operator"),
                         ("ClusterRoleBinding", "fl-operator"), ("Deployment", "fl-operator"),
                         ("ClusterRole", "fl-operator-certificate-requester"),
                         ("ClusterRoleBinding", "fl-operator-certificate-requester"),
                         ("Federation", "default")}
    # Only the watched namespaces' accounts may file certificate requests.
    assert docs[("ClusterRoleBinding", "fl-operator-certificate-requester")]["subjects"] == [
        {"kind": "Group", "apiGroup": "rbac.authorization.k8s.io",
         "name": "system:serviceaccounts:team-a"}]
    container = docs[("Deployment", "fl-operator")]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-2:] == ["--namespace", "team-a"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Metrics on, and findable by the scrape config in the values (pod annotations).
    port = container["args"][container["args"].index("--metrics-port") + 1]
    annotations = docs[("Deployment", "fl-operator")]["spec"]["template"]["metadata"][
        "annotations"]
    assert annotations["prometheus.io/port"] == port
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["metrics"]["scrapeConfig"]["kubernetes_sd_configs"] == [{"role": "pod"}]
    assert docs[("Federation", "default")]["spec"]["image"] == "fedkube:0.1.0"
    assert "directorResources" not in docs[("Federation", "default")]["spec"]  # defaults
    sized = cluster.helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                         "--set", "federation.enabled=true",
                         "--set", "federation.directorResources.requests.cpu=3",
                         "--set", "federation.envoyResources.limits.memory=1Gi").stdout
    federation = next(d for d in yaml.safe_load_all(sized) if d and d["kind"] == "Federation")
    assert federation["spec"]["directorResources"] == {"requests": {"cpu": 3}}
    assert federation["spec"]["envoyResources"] == {"limits": {"memory": "1Gi"}}


@pytest.mark.parametrize(("value", "complaint"), [
    ("operator.livenessPort=eighty", "/operator/livenessPort"),  # not an integer
    ("federation.directorFrontends=1.5", "/federation/directorFrontends"),
    ("federation.enabled=yes please", "/federation/enabled"),  # not a boolean
])
def test_lint_checks_the_values_against_the_schema(cluster: ControlPlane, value: str,
                                                   complaint: str) -> None:
    lint = cluster.helm("lint", str(CHART), "--strict", "--set", value, check=False)
    assert lint.returncode != 0, lint.stdout
    assert "1 chart(s) failed" in lint.stdout + lint.stderr
    assert complaint in lint.stdout + lint.stderr


def test_every_value_in_the_schema_is_described() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def undescribed(node: dict[str, object], path: str) -> list[str]:
        properties = node.get("properties") or {}
        assert isinstance(properties, dict)
        return [f"{path}{name}" for name, prop in properties.items()
                if "description" not in prop] + [
            missing for name, prop in properties.items()
            for missing in undescribed(prop, f"{path}{name}.")]

    assert undescribed(schema, "") == []
    assert set(values) == set(schema["properties"])  # every top-level value in the schema


def test_install_creates_crds_and_an_available_operator(cluster: ControlPlane) -> None:
    installed = cluster.helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                             "--create-namespace").stdout
    # The chart's NOTES: what was installed, how to check it, what to do next.
    assert f"release {RELEASE} in namespace {NAMESPACE}" in installed
    assert f"deployment/{RELEASE}-operator" in installed
    assert "kubectl get federations,shards,experiments -A" in installed
    assert "deploy/federation.yaml" in installed and "deploy/experiment.yaml" in installed
    crds = json.loads(cluster.kubectl("get", "crd", "-o", "json").stdout)["items"]
    assert {"federations.fedkube.io", "shards.fedkube.io", "experiments.fedkube.io"} <= {
        c["metadata"]["name"] for c in crds}
    cluster.kubectl("-n", NAMESPACE, "wait", "--for=condition=Available",
                    f"deployment/{RELEASE}-operator", "--timeout=90s")


@pytest.mark.parametrize(("verb", "resource", "allowed"), [
    ("watch", "experiments.fedkube.io", True),
    ("patch", "experiments.fedkube.io --subresource=status", True),
    ("patch", "experiments.fedkube.io", True),
    ("create", "deployments.apps", True),
    ("create", "daemonsets.apps", True),
    ("create", "networkpolicies.networking.k8s.io", True),
    ("create", "secrets", True),
    ("create", "events", True),
    ("delete", "experiments.fedkube.io", False),
    ("delete", "secrets", False),
    ("list", "secrets", False),
    ("delete", "deployments.apps", False),
    ("create", "clusterroles.rbac.authorization.k8s.io", False),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", False),
    ("list", "nodes", False),
    ("create", "pods --subresource=exec", False),
    ("get", "pods --subresource=log", True),
    # The signer of shard certificates, for its own signer name only.
    ("watch", "certificatesigningrequests.certificates.k8s.io", True),
    ("update", "certificatesigningrequests.certificates.k8s.io --subresource=approval", True),
    ("update", "certificatesigningrequests.certificates.k8s.io --subresource=status", True),
    ("approve", "signers.certificates.k8s.io/fedkube.io/shard", True),
    ("sign", "signers.certificates.k8s.io/fedkube.io/shard", True),
    ("approve", "signers.certificates.k8s.io/kubernetes.io/kube-apiserver-client", False),
    ("sign", "signers.certificates.k8s.io/kubernetes.io/kubelet-serving", False),
    ("delete", "certificatesigningrequests.certificates.k8s.io", False),
])
def test_operator_rbac_is_least_privilege(cluster: ControlPlane, verb: str, resource: str,
                                          allowed: bool) -> None:
    assert cluster.can_i(verb, resource, user=OPERATOR, namespace="team-a") is allowed


@pytest.mark.parametrize(("value", "complaint"), [
    ("image.pullPolicy=Sometimes", "pullPolicy"),
    ("federation.tls=plain", "tls"),
    ("operator.livenessPort=0", "livenessPort"),
    ("federation.directorFrontend=2", "directorFrontend"),  # a typo: unknown keys refused
])
def test_values_outside_the_schema_are_refused(cluster: ControlPlane, value: str,
                                               complaint: str) -> None:
    result = cluster.helm("template", RELEASE, str(CHART), "--set", value, check=False)
    assert result.returncode != 0, result.stdout[:500]
    assert "values don't meet the specifications of the schema" in result.stderr
    assert complaint in result.stderr
