"""The custom resources (group fedkube.io, v1alpha1): pydantic models of their specs and
statuses. They are the single source of the CRDs in `crds/` (see `fedkube.api.crds`) and
the types the operator reads specs into."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from fedkube.api.compute import ComputeResources
from fedkube.api.policy import ShardPolicy

GROUP = "fedkube.io"
VERSION = "v1alpha1"
DNS_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A node's name: a DNS subdomain (it keys the envoys' ConfigMap and names certificates).
NODE_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# One dimension of a sample or target shape: it becomes a director flag's value.
DIMENSION = r"^[0-9]{1,9}$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"
# What `make image` builds (no registry publishes fedkube's image): load it into the
# cluster's nodes (`kind load docker-image fedkube:0.1.0`, `minikube image load ...`) or
# push it to a registry of your own and set Federation.spec.image / the chart's image.
DEFAULT_IMAGE = "fedkube:0.1.0"


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


def _k8s(**extra: Any) -> dict[str, Any]:
    return {"json_schema_extra": extra}


# -- status pieces shared by all kinds ----------------------------------------------------

class Condition(_Model):
    """metav1.Condition."""

    type: str = Field(max_length=316, description="the condition's kind, e.g. Ready")
    status: Literal["True", "False", "Unknown"] = Field(
        description="True, False or Unknown")
    reason: str = Field(max_length=1024,
                        description="why, as one CamelCase word (kubectl get shows it)")
    message: str = Field(default="", max_length=32768, description="why, for people")
    last_transition_time: str = Field(description="when the status last changed")
    observed_generation: int = Field(
        default=0, ge=0, description="the object's generation the condition was set for")


_CONDITIONS = Field(default_factory=list,
                    description="Ready and the conditions it follows, each with its reason",
                    **_k8s(**{"x-kubernetes-list-type": "map",
                              "x-kubernetes-list-map-keys": ["type"]}))


# -- Federation ---------------------------------------------------------------------------

class FederationSpec(_Model):
    """One director and its envoys."""

    image: str = Field(default=DEFAULT_IMAGE, min_length=1, max_length=512,
                       description="the image that runs director, envoy and collaborator")
    tls: Literal["mtls", "insecure"] = Field(
        default="mtls", description=(
            "mtls (default): the operator makes the CA and the director's certificate, and "
            "signs each envoy's and collaborator's request for its own shard's certificate "
            "(a CertificateSigningRequest from a Pod on that shard's node); insecure: for "
            "local development only"))
    storage: str = Field(default="1Gi", pattern=QUANTITY,
                         description="size of the director's volume (state and models)")
    sample_shape: list[Annotated[str, Field(pattern=DIMENSION)]] = Field(
        min_length=1, max_length=8, description="shape every shard's samples must have")
    target_shape: list[Annotated[str, Field(pattern=DIMENSION)]] = Field(
        min_length=1, max_length=8, description="shape every shard's targets must have")
    health_check_period_seconds: int = Field(
        default=60, ge=1, le=3600,
        description="how often each envoy reports to the director; an envoy silent for "
                    "two periods is offline")
    director_frontends: int = Field(
        default=0, ge=0, le=64,
        description="processes in the director's pod that share its port and answer "
                    "health checks, each about one more core's worth: for federations of "
                    "many thousands of envoys")
    director_resources: ComputeResources | None = Field(
        default=None,
        description="the director container's requests and limits; default: requests of "
                    "one CPU for the director and one per frontend, and 1Gi of memory")
    envoy_resources: ComputeResources | None = Field(
        default=None,
        description="each envoy container's requests and limits (its collaborators are "
                    "Pods of their own); default: requests of 100m CPU and 256Mi")
    envoy_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"},
        description="where envoy pods run (GPU nodes by default)")
    max_queued_per_owner: int = Field(
        default=100, ge=0, le=1_000_000,
        description="experiments one owner may have waiting for shards; 0: no limit. "
                    "Owners take turns for busy shards whatever this is")
    max_stored_bytes_per_owner: int = Field(
        default=100 << 30, ge=0,
        description="bytes one owner's experiments may hold on the director's volume "
                    "(archives, models, metrics); 0: no limit")
    director_endpoint: str | None = Field(
        default=None, max_length=512,
        description="host:port at which the operator reaches the director; default: its "
                    "Service. Set it when the director runs outside the cluster "
                    "(local development, tests)")


class FederationStatus(_Model):
    """DirectorAvailable from the director's Deployment, Ready once the director answers."""

    conditions: list[Condition] = _CONDITIONS
    director_endpoint: str = Field(default="",
                                   description="host:port at which the operator reaches "
                                               "the director")
    observed_generation: int = Field(default=0,
                                     description="the generation the operator last applied")


# -- Shard --------------------------------------------------------------------------------

class CudaDevice(_Model):
    """A GPU of the shard's node, as its envoy last reported it."""

    index: int = Field(ge=0, description="the device's CUDA index")
    name: str = Field(default="", description="the device's model")
    memory_total_mib: int = Field(default=0, ge=0, description="its memory, in MiB")
    memory_used_mib: int = Field(default=0, ge=0, description="memory in use, in MiB")
    utilization_percent: int = Field(default=0, ge=0, le=100,
                                     description="its utilization, 0 to 100")


class ShardSpec(_Model):
    """A data shard on a node; the envoy on that node registers it."""

    federation: str = Field(min_length=1, max_length=253, pattern=DNS_NAME,
                            description="the Federation (in this namespace) it belongs to")
    node_name: str | None = Field(
        default=None, max_length=253, pattern=NODE_NAME,
        description="the node whose envoy serves this shard (one shard per node)")
    loader: str = Field(default="digits", min_length=1, max_length=256,
                        description="a built-in shard loader or module:Class")
    options: dict[str, str] = Field(default_factory=dict,
                                    description="settings passed to the loader")
    data_path: str | None = Field(default=None, max_length=4096,
                                  description="host path of the data on its node")
    policy: ShardPolicy = Field(
        default_factory=ShardPolicy,
        description="what the shard's data owner lets run on it: owners, tasks, user code, "
                    "requirements, limits, and whether each experiment waits for "
                    "approval; default: built-in tasks only, approved automatically")


class ShardStatus(_Model):
    """From the director's registry of envoys."""

    conditions: list[Condition] = _CONDITIONS
    online: bool = Field(default=False,
                         description="whether its envoy's health checks are arriving")
    gpus: int = Field(default=0, description="GPUs its envoy reports")
    last_health_check: str | None = Field(
        default=None, description="when its envoy last reported (to the minute)")
    cuda_devices: list[CudaDevice] = Field(default_factory=list,
                                           description="its envoy's GPUs")
    current_experiment: str | None = Field(default=None,
                                           description="the experiment running on it")
    node: str | None = Field(default=None, description="the node of its envoy")


# -- Experiment ---------------------------------------------------------------------------

class ExperimentSpec(_Model):
    """A federated training run, submitted to its federation's director."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!has(self.minCollaborators) || !has(self.shards) || "
                 "self.minCollaborators <= size(self.shards)",
         "message": "minCollaborators must not exceed the number of shards listed"},
        {"rule": "self.federation == oldSelf.federation",
         "message": "federation is immutable"},
    ]})

    federation: str = Field(min_length=1, max_length=253, pattern=DNS_NAME,
                            description="the Federation (in this namespace) to run on; "
                                        "immutable")
    task: str = Field(min_length=1, max_length=200,
                      description="a built-in task: digits-logreg, digits-mlp")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="task parameters (learning_rate, epochs, ...)")
    rounds: int = Field(default=10, ge=1, le=100_000,
                        description="training rounds: each collaborator trains, the "
                                    "director aggregates")
    min_collaborators: int | None = Field(
        default=None, ge=1, le=10_000,
        description="a round closes at its deadline with at least this many collaborators "
                    "(the others are dropped); default: all of them")
    shards: list[Annotated[str, Field(max_length=253)]] | None = Field(
        default=None, min_length=1, max_length=10_000,
        description="shard names; default: every online shard")
    gpus_per_collaborator: int = Field(default=0, ge=0, le=64,
                                       description="GPUs each collaborator Pod requests")
    collaborator_resources: ComputeResources | None = Field(
        default=None, description="each collaborator Pod's requests and limits besides its "
                                  "GPUs (gpusPerCollaborator), e.g. memory for its data")
    round_timeout_seconds: int = Field(default=600, ge=1, le=7 * 24 * 3600,
                                       description="a round's deadline")
    metric: str = Field(default="accuracy", min_length=1, max_length=63,
                        description="the validation metric that picks the best model")
    higher_is_better: bool = Field(default=True,
                                   description="whether a higher metric is better")


class ShardDecision(_Model):
    """A shard's decision on an experiment."""

    decision: Literal["accepted", "refused", "awaiting"] = Field(
        description="accepted, refused, or awaiting its data owner's answer")
    reason: str = Field(default="", max_length=2000, description="why")


class ExperimentStatus(_Model):
    """From the director's report of the experiment."""

    conditions: list[Condition] = _CONDITIONS
    phase: str = Field(default="", description="Pending, Accepted, Queued, Running, "
                                                "Succeeded or Failed")
    round: int = Field(default=0, description="rounds done")
    total_rounds: int = Field(default=0, description="rounds planned")
    progress: str = Field(default="", description="round/total, for kubectl get")
    metric: str = Field(default="", description="the metric of bestMetric and lastMetric")
    best_metric: float | None = Field(default=None,
                                      description="the best aggregated validation metric")
    last_metric: float | None = Field(default=None,
                                      description="the last round's aggregated metric")
    collaborators: list[Annotated[str, Field(max_length=253)]] = Field(
        default_factory=list, description="the shards it was submitted with")
    dropped_collaborators: list[Annotated[str, Field(max_length=253)]] = Field(
        default_factory=list,
        description="collaborators that missed a round's deadline (the round closed on quorum)")
    queue_position: int = Field(default=0,
                                description="its place among experiments waiting for "
                                            "busy shards; 0: not waiting")
    review: dict[str, ShardDecision] = Field(
        default_factory=dict, description="each shard's decision on the experiment (its "
                                          "shard policy's, or its data owner's)")
    start_time: str | None = Field(default=None,
                                   description="when the director started it")
    completion_time: str | None = Field(default=None, description="when it ended")
    model_location: str | None = Field(default=None,
                                       description="how to fetch its best model")
    error: str | None = Field(default=None, description="why it failed")
    observed_generation: int = Field(default=0,
                                     description="the generation the status describes")


# -- the kinds ----------------------------------------------------------------------------

PrinterColumn = dict[str, Any]


class Kind(BaseModel):
    kind: str
    plural: str
    short_names: list[str]
    spec: type[_Model]
    status: type[_Model]
    columns: list[PrinterColumn]


def _column(name: str, path: str, kind: str = "string", priority: int = 0,
            description: str = "") -> PrinterColumn:
    column: PrinterColumn = {"name": name, "type": kind, "jsonPath": path}
    if priority:
        column["priority"] = priority
    if description:
        column["description"] = description
    return column


AGE = _column("Age", ".metadata.creationTimestamp", "date")

READY = _column("Ready", '.status.conditions[?(@.type=="Ready")].status')
REASON = _column("Reason", '.status.conditions[?(@.type=="Ready")].reason',
                 description="why it is (not) Ready: kubectl describe has the message")

FEDERATION = Kind(kind="Federation", plural="federations", short_names=["fed"],
                  spec=FederationSpec, status=FederationStatus, columns=[
                      READY, REASON,
                      _column("TLS", ".spec.tls"),
                      _column("Director", ".status.directorEndpoint"), AGE])
SHARD = Kind(kind="Shard", plural="shards", short_names=["shard"], spec=ShardSpec,
             status=ShardStatus, columns=[
                 READY, REASON,
                 _column("Online", ".status.online", "boolean"),
                 _column("GPUs", ".status.gpus", "integer"),
                 _column("Node", ".spec.nodeName"),
                 _column("Experiment", ".status.currentExperiment", priority=1),
                 _column("Federation", ".spec.federation", priority=1), AGE])
EXPERIMENT = Kind(kind="Experiment", plural="experiments", short_names=["exp"],
                  spec=ExperimentSpec, status=ExperimentStatus, columns=[
                      READY,
                      _column("Status", ".status.phase"), REASON,
                      _column("Round", ".status.progress"),
                      _column("Metric", ".status.bestMetric", "number",
                              description="best validation metric"),
                      _column("Federation", ".spec.federation", priority=1), AGE])
KINDS = [FEDERATION, SHARD, EXPERIMENT]
