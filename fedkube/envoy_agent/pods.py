"""The collaborator Pod an envoy's pod runtime creates: a pure function of the job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedkube.api.names import dns_label, label_value
from fedkube.envoy_agent.runtime import CollaboratorJob

GPU = "nvidia.com/gpu"
TLS_DIR = "/etc/fedkube/tls"
CA_DIR = "/etc/fedkube/ca"
WORK_DIR = "/var/lib/fedkube/work"
REQUESTED_TLS_DIR = f"{WORK_DIR}/tls"


@dataclass(frozen=True)
class PodPlacement:
    namespace: str
    node_name: str
    image: str
    director: str
    loader: str
    options: dict[str, str]
    tls_secret: str | None = None
    # Instead of a Secret: the CA from this ConfigMap, and a certificate the Pod requests
    # for its shard as this service account (fedkube.kube.csr).
    ca_config_map: str | None = None
    certificate_account: str | None = None
    owner_pod: str | None = None
    owner_uid: str | None = None


def pod_name(job: CollaboratorJob) -> str:
    """`collab-<experiment>-<shard>`, readable as far as 63 characters allow, ending in a
    digest of the pair: unique per (experiment, shard) whatever their lengths."""
    return dns_label(job.experiment, job.collaborator, prefix="collab")


def _requests_certificate(where: PodPlacement) -> bool:
    return bool(where.ca_config_map and where.certificate_account)


def _tls_args(where: PodPlacement) -> list[str]:
    if _requests_certificate(where):
        return ["--ca", f"{CA_DIR}/ca.crt", "--cert", f"{REQUESTED_TLS_DIR}/tls.crt",
                "--key", f"{REQUESTED_TLS_DIR}/tls.key", "--request-certificate"]
    if where.tls_secret:
        return ["--ca", f"{TLS_DIR}/ca.crt", "--cert", f"{TLS_DIR}/tls.crt",
                "--key", f"{TLS_DIR}/tls.key"]
    return ["--insecure"]


def collaborator_resources(job: CollaboratorJob) -> dict[str, dict[str, str]]:
    """The plan's requests and limits, with its GPUs as a limit (as the device plugin
    wants: the request follows)."""
    given = job.resources
    resources = {"requests": dict(given.requests) if given else {},
                 "limits": dict(given.limits) if given else {}}
    if job.gpus:
        resources["limits"][GPU] = str(job.gpus)
    return {key: value for key, value in resources.items() if value}


def build_collaborator_pod(job: CollaboratorJob, where: PodPlacement) -> dict[str, Any]:
    tls = _tls_args(where)
    options = [arg for key, value in sorted(where.options.items())
               for arg in ("--shard-option", f"{key}={value}")]
    container: dict[str, Any] = {
        "name": "collaborator", "image": where.image, "command": ["fedkube"],
        "args": ["--log-format", "json", "collaborator", "run", "--director", where.director,
                 "--experiment", job.experiment, "--name", job.collaborator,
                 "--work-dir", WORK_DIR, "--shard", where.loader, *options, *tls],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "work", "mountPath": WORK_DIR},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    resources = collaborator_resources(job)
    if resources:
        container["resources"] = resources
    volumes: list[dict[str, Any]] = [{"name": "work", "emptyDir": {}},
                                     {"name": "tmp", "emptyDir": {}}]
    requests_certificate = _requests_certificate(where)
    if requests_certificate:
        container["volumeMounts"].append({"name": "ca", "mountPath": CA_DIR, "readOnly": True})
        volumes.append({"name": "ca", "configMap": {"name": where.ca_config_map}})
    elif where.tls_secret:
        container["volumeMounts"].append({"name": "tls", "mountPath": TLS_DIR,
                                          "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": where.tls_secret,
                                                  "defaultMode": 0o400}})
    metadata: dict[str, Any] = {
        "name": pod_name(job), "namespace": where.namespace,
        "labels": {"app.kubernetes.io/name": "fedkube",
                   "app.kubernetes.io/component": "collaborator",
                   "fedkube.io/collaborator": label_value(job.collaborator)},
        "annotations": {"fedkube.io/experiment": job.experiment},
    }
    if where.owner_pod and where.owner_uid:
        # Owned by the envoy pod: if the envoy goes, its collaborators go too.
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod",
                                        "name": where.owner_pod, "uid": where.owner_uid,
                                        "controller": True, "blockOwnerDeletion": False}]
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
        "spec": {
            "restartPolicy": "Never",
            # Pinned through the scheduler (as DaemonSets do), not spec.nodeName, so a Pod
            # asking for GPUs the node lacks stays Pending with the scheduler's reason.
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchFields": [{
                    "key": "metadata.name", "operator": "In", "values": [where.node_name]}]}]}}},
            "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            # A token only to prove the Pod's node when requesting its certificate; the
            # account has no Role.
            **({"serviceAccountName": where.certificate_account,
                "automountServiceAccountToken": True} if requests_certificate else
               {"automountServiceAccountToken": False}),
            "containers": [container],
            "volumes": volumes,
        },
    }
