"""Kubernetes manifests of a Federation, as pure functions: spec in, dict out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from fedkube.api.compute import ComputeResources
from fedkube.api.config import DEFAULT_PORT
from fedkube.api.resources import GROUP, FederationSpec, ShardSpec

Manifest = dict[str, Any]
APP = "app.kubernetes.io/name"
PART_OF = "app.kubernetes.io/part-of"
COMPONENT = "app.kubernetes.io/component"
FEDERATION_LABEL = "fedkube.io/federation"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
DATA_DIR = "/var/lib/fedkube"
TLS_DIR = "/etc/fedkube/tls"
ENVOY_CONFIG_DIR = "/etc/fedkube/envoy"
CA_DIR = "/etc/fedkube/ca"
# Where an envoy keeps the key and certificate it requested for its shard (never a Secret).
ENVOY_TLS_DIR = f"{DATA_DIR}/tls"
ENVOY_WORK_DIR = f"{DATA_DIR}/work"
# Envoy certificates last 90 days and are renewed a third of that before they expire (as
# cert-manager's defaults): a month to notice an operator that is down.
ENVOY_CERTIFICATE_LIFETIME_S = 90 * 24 * 3600

_RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
METRICS_PORT = 9090
BULK_PORT = DEFAULT_PORT + 1  # the director's model transfers beside gRPC
# The director's plaintext port that serves grpc.health.v1.Health alone, for the kubelet's
# grpc probe: that probe cannot do TLS, so under mTLS it cannot use the gRPC port
# (fedkube.director.server). Probed on the pod's IP only; the Service does not carry it.
HEALTH_PORT = DEFAULT_PORT + 2
# Read by the scrape config in the chart's values (no Prometheus Operator needed).
SCRAPE_ANNOTATIONS = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                      "prometheus.io/path": "/metrics"}
_POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001,
                 "seccompProfile": {"type": "RuntimeDefault"}}
# Requests only, by default: a scheduler that knows what the pods need, and no limit to
# throttle a round's close or kill an aggregator holding a large model.
ENVOY_REQUESTS = {"cpu": "100m", "memory": "256Mi"}
DIRECTOR_MEMORY_REQUEST = "1Gi"


def _resources(given: ComputeResources | None, default: dict[str, str]) -> dict[str, Any]:
    if given is None:
        return {"requests": dict(default)}
    return {key: dict(value) for key, value in (("requests", given.requests),
                                                  ("limits", given.limits)) if value}


def director_resources(spec: FederationSpec) -> dict[str, Any]:
    """Each frontend is about one more core's worth of health checks
    (docs/benchmarks.md), so the default CPU request grows with them."""
    return _resources(spec.director_resources,
                      {"cpu": str(1 + spec.director_frontends),
                       "memory": DIRECTOR_MEMORY_REQUEST})


@dataclass(frozen=True)
class FederationNames:
    """The names of the objects a Federation owns, all made from its own name."""

    director: str  # the director's Deployment and Service
    envoy: str  # the envoys' DaemonSet, ServiceAccount, Role and RoleBinding
    data: str  # the director's PersistentVolumeClaim
    ca: str  # the Secret of the federation's CA (key included)
    director_tls: str  # the Secret of the director's certificate
    ca_bundle: str  # the ConfigMap of the CA certificate alone
    collaborator: str  # the collaborator Pods' ServiceAccount
    operator_tls: str  # the Secret of the operator's client certificate
    envoy_config: str  # the ConfigMap of every node's envoy settings


def names(federation: str) -> FederationNames:
    return FederationNames(
        director=f"{federation}-director", envoy=f"{federation}-envoy",
        data=f"{federation}-director-data", ca=f"{federation}-ca",
        director_tls=f"{federation}-director-tls", ca_bundle=f"{federation}-ca-bundle",
        collaborator=f"{federation}-collaborator",
        operator_tls=f"{federation}-operator-tls",
        envoy_config=f"{federation}-envoy-config")


def labels(federation: str, component: str) -> dict[str, str]:
    return {APP: "fedkube", PART_OF: federation, COMPONENT: component,
            FEDERATION_LABEL: federation}


def service_endpoint(federation: str, namespace: str) -> str:
    return f"{names(federation).director}.{namespace}.svc:{DEFAULT_PORT}"


def director_endpoint(federation: str, namespace: str, spec: FederationSpec) -> str:
    return spec.director_endpoint or service_endpoint(federation, namespace)


def _tls_flags(spec: FederationSpec) -> list[str]:
    if spec.tls == "insecure":
        return ["--insecure"]
    return ["--ca", f"{TLS_DIR}/ca.crt", "--cert", f"{TLS_DIR}/tls.crt",
            "--key", f"{TLS_DIR}/tls.key"]


def _tls_volume(spec: FederationSpec, secret: str) -> tuple[list[Manifest], list[Manifest]]:
    if spec.tls == "insecure":
        return [], []
    return ([{"name": "tls", "secret": {"secretName": secret, "defaultMode": 0o400}}],
            [{"name": "tls", "mountPath": TLS_DIR, "readOnly": True}])


def _ca_volume(federation: str, spec: FederationSpec) -> tuple[list[Manifest], list[Manifest]]:
    """The federation's CA certificate alone (public): envoys request their own key pair."""
    if spec.tls == "insecure":
        return [], []
    return ([{"name": "ca", "configMap": {"name": names(federation).ca_bundle}}],
            [{"name": "ca", "mountPath": CA_DIR, "readOnly": True}])


def build_director_pvc(name: str, namespace: str, spec: FederationSpec) -> Manifest:
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": names(name).data, "namespace": namespace,
                     "labels": labels(name, "director")},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": spec.storage}}},
    }


def build_director_service(name: str, namespace: str, spec: FederationSpec) -> Manifest:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": names(name).director, "namespace": namespace,
                     "labels": labels(name, "director")},
        "spec": {"selector": labels(name, "director"),
                 "ports": [{"name": "grpc", "port": DEFAULT_PORT, "targetPort": "grpc",
                            "appProtocol": "grpc"},
                           # Collaborators reach the bulk port at the host of the gRPC
                           # one, so the Service carries both.
                           {"name": "bulk", "port": BULK_PORT, "targetPort": "bulk",
                            "appProtocol": "fedkube.io/bulk"}]},
    }


def build_director_deployment(name: str, namespace: str, spec: FederationSpec) -> Manifest:
    volumes, mounts = _tls_volume(spec, names(name).director_tls)
    # Global options before the command: `fedkube director start --log-format` is refused.
    args = ["--log-format", "json", "director", "start", "--host", "0.0.0.0",
            "--port", str(DEFAULT_PORT),
            "--data-dir", DATA_DIR, "--sample-shape", ",".join(spec.sample_shape),
            "--target-shape", ",".join(spec.target_shape),
            "--health-check-period", str(spec.health_check_period_seconds),
            "--metrics-port", str(METRICS_PORT), "--bulk-port", str(BULK_PORT),
            "--health-port", str(HEALTH_PORT),
            "--frontends", str(spec.director_frontends),
            "--max-queued-per-owner", str(spec.max_queued_per_owner),
            "--max-stored-bytes-per-owner", str(spec.max_stored_bytes_per_owner),
            *_tls_flags(spec)]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": names(name).director, "namespace": namespace,
                     "labels": labels(name, "director")},
        "spec": {
            "replicas": 1,
            # One writer of the SQLite store: the old pod goes before the new one starts.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels(name, "director")},
            "template": {
                "metadata": {"labels": labels(name, "director"),
                             "annotations": SCRAPE_ANNOTATIONS},
                "spec": {
                    "securityContext": _POD_SECURITY,
                    "automountServiceAccountToken": False,
                    "containers": [{
                        "name": "director", "image": spec.image,
                        "args": args,
                        "resources": director_resources(spec),
                        "ports": [{"name": "grpc", "containerPort": DEFAULT_PORT},
                                  {"name": "bulk", "containerPort": BULK_PORT},
                                  {"name": "metrics", "containerPort": METRICS_PORT},
                                  {"name": "health", "containerPort": HEALTH_PORT}],
                        # SERVING once the store is open and the aggregators run, in either
                        # TLS mode; NOT_SERVING from SIGTERM on (it exits within seconds).
                        "readinessProbe": {"grpc": {"port": HEALTH_PORT}},
                        # Resuming many large experiments may take minutes: liveness counts
                        # only once started. Then a director that answers no health check
                        # for a minute (its event loop stuck) is restarted.
                        "startupProbe": {"grpc": {"port": HEALTH_PORT}, "periodSeconds": 2,
                                         "failureThreshold": 300},
                        "livenessProbe": {"grpc": {"port": HEALTH_PORT}, "periodSeconds": 10,
                                          "timeoutSeconds": 5, "failureThreshold": 6},
                        "securityContext": _RESTRICTED_CONTAINER,
                        "volumeMounts": [{"name": "data", "mountPath": DATA_DIR},
                                         {"name": "tmp", "mountPath": "/tmp"}, *mounts],
                    }],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {
                                    "claimName": names(name).data}},
                                {"name": "tmp", "emptyDir": {}}, *volumes],
                },
            },
        },
    }


def build_envoy_config(federation: str, namespace: str, spec: FederationSpec,
                       shards: dict[str, ShardSpec]) -> Manifest:
    """The envoy settings of each node, keyed by node name: the DaemonSet pod on a node
    reads its own key. One shard per node: of two on one node, the first by name holds it
    (node_conflicts says which other is left out)."""
    data = {}
    taken = set(node_conflicts({n: s.node_name for n, s in shards.items()}))
    for shard_name, shard in sorted(shards.items()):
        if not shard.node_name or shard_name in taken:
            continue
        config: dict[str, Any] = {
            "name": shard_name, "director": service_endpoint(federation, namespace),
            "shard": {"loader": shard.loader, "options": shard.options},
            "runtime": "pod", "work_dir": ENVOY_WORK_DIR, "shard_namespace": namespace,
            # The data owner's policy, as the Shard says it (the envoy enforces it).
            "policy": shard.policy.model_dump(mode="json", by_alias=True,
                                              exclude_defaults=True),
            "pod": ({} if spec.tls == "insecure" else
                    {"ca_config_map": names(federation).ca_bundle,
                     "certificate_account": names(federation).collaborator}),
            "tls": ({"insecure": True} if spec.tls == "insecure" else
                    {"ca": f"{CA_DIR}/ca.crt", "cert": f"{ENVOY_TLS_DIR}/tls.crt",
                     "key": f"{ENVOY_TLS_DIR}/tls.key", "request_certificate": True,
                     "certificate_lifetime_s": ENVOY_CERTIFICATE_LIFETIME_S})}
        data[f"{shard.node_name}.yaml"] = yaml.safe_dump(config, sort_keys=False)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": names(federation).envoy_config, "namespace": namespace,
                         "labels": labels(federation, "envoy")},
            "data": data}


def node_conflicts(nodes: Mapping[str, str | None]) -> dict[str, str]:
    """Shards (shard -> its node) left out because another, first by name, holds their
    node: name -> why."""
    holder: dict[str, str] = {}
    left_out = {}
    for shard_name, node in sorted(nodes.items()):
        if not node:
            continue
        if node in holder:
            left_out[shard_name] = (f"node {node!r} already serves shard "
                                    f"{holder[node]!r} (one shard per node)")
        else:
            holder[node] = shard_name
    return left_out


def _envoy_probe(*, ready: bool, period: int, failures: int) -> Manifest:
    command = ["fedkube", "envoy", "probe", "--work-dir", ENVOY_WORK_DIR]
    return {"exec": {"command": [*command, "--ready"] if ready else command},
            "periodSeconds": period, "timeoutSeconds": 10, "failureThreshold": failures}


def build_envoy_daemonset(name: str, namespace: str, spec: FederationSpec) -> Manifest:
    volumes, mounts = _ca_volume(name, spec)
    config = f"{ENVOY_CONFIG_DIR}/$(NODE_NAME).yaml"
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": names(name).envoy, "namespace": namespace,
                     "labels": labels(name, "envoy")},
        "spec": {
            "selector": {"matchLabels": labels(name, "envoy")},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": labels(name, "envoy")},
                "spec": {
                    "nodeSelector": dict(spec.envoy_node_selector),
                    "tolerations": [GPU_TOLERATION],
                    "serviceAccountName": names(name).envoy,
                    "securityContext": _POD_SECURITY,
                    "containers": [{
                        "name": "envoy", "image": spec.image,
                        "command": ["fedkube"],
                        "args": ["--log-format", "json", "envoy", "start", "--config", config],
                        "resources": _resources(spec.envoy_resources, ENVOY_REQUESTS),
                        "env": [
                            {"name": "NODE_NAME",
                             "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                            {"name": "POD_NAME",
                             "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "POD_UID",
                             "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                            {"name": "POD_NAMESPACE",
                             "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            # Collaborator Pods run the envoy's own image.
                            {"name": "FEDKUBE_IMAGE", "value": spec.image}],
                        "securityContext": _RESTRICTED_CONTAINER,
                        # fedkube.envoy_agent.health: live while its loop runs, ready
                        # while its shard is registered and the director answers.
                        "livenessProbe": _envoy_probe(ready=False, period=20, failures=3),
                        "readinessProbe": _envoy_probe(ready=True, period=5, failures=1),
                        "volumeMounts": [
                            {"name": "config", "mountPath": ENVOY_CONFIG_DIR, "readOnly": True},
                            {"name": "work", "mountPath": DATA_DIR}, *mounts],
                    }],
                    "volumes": [{"name": "config", "configMap": {
                                    "name": names(name).envoy_config, "optional": True}},
                                {"name": "work", "emptyDir": {}}, *volumes],
                },
            },
        },
    }


def build_envoy_rbac(name: str, namespace: str) -> list[Manifest]:
    """The envoy may create, watch and delete collaborator Pods in its namespace, and read
    Shards (its data owner's answers): nothing else. Collaborator Pods get an account of
    their own with no Role at all: its token only proves their node when they request
    their shard's certificate."""
    account = names(name).envoy
    meta = {"name": account, "namespace": namespace, "labels": labels(name, "envoy")}
    collaborator = {"name": names(name).collaborator, "namespace": namespace,
                    "labels": labels(name, "collaborator")}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": collaborator,
         "automountServiceAccountToken": False},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
         "rules": [{"apiGroups": [""], "resources": ["pods"],
                    "verbs": ["create", "get", "list", "watch", "delete"]},
                   {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
                   # Its data owner's answers: the Shards' annotations (read only).
                   {"apiGroups": [GROUP], "resources": ["shards"], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
         "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]},
    ]


def build_tls_secret(name: str, namespace: str, federation: str, *, ca_pem: bytes,
                     cert_pem: bytes, key_pem: bytes) -> Manifest:
    import base64

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": labels(federation, "tls")},
            "data": {"ca.crt": b64(ca_pem), "tls.crt": b64(cert_pem), "tls.key": b64(key_pem)}}


def build_ca_bundle(federation: str, namespace: str, ca_pem: bytes) -> Manifest:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": names(federation).ca_bundle, "namespace": namespace,
                         "labels": labels(federation, "tls")},
            "data": {"ca.crt": ca_pem.decode()}}


def build_collaborator_network_policy(name: str, namespace: str) -> Manifest:
    """Collaborator Pods (experiments' code, next to the data) may reach the director's
    gRPC and bulk ports and DNS, and nothing else: no other host, no other Pod, no way to
    send the data anywhere but as the model updates the director aggregates. Enforced by
    the cluster's network plugin (one without NetworkPolicy support ignores it). The
    collaborators of every federation in the namespace share the label, so each one's
    policy lets them reach their own federation's director: NetworkPolicies add up."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": f"{names(name).collaborator}-egress", "namespace": namespace,
                     "labels": labels(name, "collaborator")},
        "spec": {
            "podSelector": {"matchLabels": {APP: "fedkube", COMPONENT: "collaborator"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],  # nothing calls a collaborator
            "egress": [
                {"to": [{"podSelector": {"matchLabels": labels(name, "director")}}],
                 "ports": [{"protocol": "TCP", "port": DEFAULT_PORT},
                           {"protocol": "TCP", "port": BULK_PORT}]},
                {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
            ],
        },
    }


def build_federation_workloads(name: str, namespace: str, spec: FederationSpec) -> list[Manifest]:
    """Everything a Federation owns except its Secrets and envoy config."""
    return [build_director_pvc(name, namespace, spec),
            build_director_service(name, namespace, spec),
            build_director_deployment(name, namespace, spec),
            *build_envoy_rbac(name, namespace),
            build_envoy_daemonset(name, namespace, spec),
            build_collaborator_network_policy(name, namespace)]
