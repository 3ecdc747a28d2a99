"""The operator's pure parts, without a cluster: CRDs, manifests, conditions, statuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from fedkube.api.compute import ComputeResources
from fedkube.api.crds import build_crd, crd_files
from fedkube.api.reference import reference_markdown
from fedkube.api.resources import (
    EXPERIMENT,
    ExperimentSpec,
    FederationSpec,
    ShardSpec,
)
from fedkube.cli import build_parser
from fedkube.cli.director import director_config
from fedkube.client import EnvoyView, ExperimentView
from fedkube.operator.conditions import set_condition
from fedkube.operator.experiments import build_plan, build_status
from fedkube.operator.manifests import (
    build_collaborator_network_policy,
    build_director_deployment,
    build_director_service,
    build_envoy_config,
    build_envoy_daemonset,
    build_federation_workloads,
    names,
)
from fedkube.operator.shards import build_shard_status
from fedkube.tasks.archive import build_archive, read_plan

ROOT = Path(__file__).resolve().parents[1]
FED = FederationSpec(sample_shape=["8", "8"], target_shape=["1"])


def test_generated_crds_are_current() -> None:
    """`make crds` (fedkube crds) must be rerun after changing fedkube/api/resources.py."""
    for directory in ("crds", "charts/fedkube/crds"):
        for name, text in crd_files().items():
            assert (ROOT / directory / name).read_text() == text, \
                f"{directory}/{name} is stale: make crds"
    assert (ROOT / "docs/crd-reference.md").read_text() == reference_markdown(), \
        "docs/crd-reference.md is stale: make crds"
    assert "`spec.minCollaborators`" in reference_markdown()


def test_experiment_crd_schema() -> None:
    crd = build_crd(EXPERIMENT)
    version = crd["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["federation", "task"]
    rounds = spec["properties"]["rounds"]
    assert {k: v for k, v in rounds.items() if k != "description"} == {
        "default": 10, "maximum": 100000, "minimum": 1, "type": "integer"}
    assert rounds["description"]  # kubectl explain experiment.spec.rounds
    assert spec["properties"]["params"]["x-kubernetes-preserve-unknown-fields"] is True
    # The one union a structural schema allows: int-or-string (resource quantities).
    def unions(node: Any) -> list[dict[str, Any]]:
        if isinstance(node, list):
            return [u for item in node for u in unions(item)]
        if not isinstance(node, dict):
            return []
        return ([node] if "anyOf" in node else []) + [u for v in node.values()
                                                      for u in unions(v)]

    found = unions(crd)
    assert found and all(u.get("x-kubernetes-int-or-string") is True for u in found)
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("size(self.shards)" in rule for rule in rules)
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Ready", "Status", "Reason", "Round", "Metric", "Federation", "Age"]
    assert crd["spec"]["names"]["categories"] == ["fl", "all"]


def test_director_deployment_is_recreated_and_locked_down() -> None:
    deployment = build_director_deployment("fed", "ns", FED)
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "--ca" in container["args"] and "8,8" in container["args"]
    insecure = build_director_deployment("fed", "ns", FED.model_copy(update={"tls": "insecure"}))
    assert "--insecure" in insecure["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(v["name"] == "tls" for v in insecure["spec"]["template"]["spec"]["volumes"])
    # Prometheus finds the director's metrics port by the pod's annotations.
    args = container["args"]
    port = args[args.index("--metrics-port") + 1]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == port
    assert {"name": "metrics", "containerPort": int(port)} in container["ports"]


def test_director_and_envoy_pods_run_commands_the_cli_accepts() -> None:
    """KWOK runs no containers, so only this shows their command lines parse."""
    director = build_director_deployment("fed", "ns", FED)["spec"]["template"]["spec"]
    envoy = build_envoy_daemonset("fed", "ns", FED)["spec"]["template"]["spec"]
    for pod, command in ((director, ("director", "start")), (envoy, ("envoy", "start"))):
        args = build_parser().parse_args(pod["containers"][0]["args"])
        assert (args.command, args.action) == command
        assert args.log_format == "json"


def test_envoy_probes_read_the_envoys_own_work_dir_through_the_cli() -> None:
    """The kubelet execs `fedkube envoy probe` (an envoy serves no port): for liveness,
    and with --ready for readiness, on the work dir the envoy's config names."""
    container = build_envoy_daemonset("fed", "ns", FED)["spec"]["template"]["spec"][
        "containers"][0]
    work_dirs = {yaml.safe_load(text)["work_dir"] for text in build_envoy_config(
        "fed", "ns", FED, {"s1": ShardSpec(federation="fed", node_name="gpu-1")})["data"].values()}
    for probe, ready in (("livenessProbe", False), ("readinessProbe", True)):
        command = container[probe]["exec"]["command"]
        assert command[0] == "fedkube"
        args = build_parser().parse_args(command[1:])
        assert (args.command, args.action, args.ready) == ("envoy", "probe", ready)
        assert {str(args.work_dir)} == work_dirs
    # Liveness is patient: a director outage must not restart envoys.
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


def test_the_director_service_carries_the_bulk_port_the_director_serves() -> None:
    insecure = FED.model_copy(update={"tls": "insecure"})  # no certificates to read here
    pod = build_director_deployment("fed", "ns", insecure)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config = director_config(build_parser().parse_args(container["args"]))
    assert config.bulk_port and config.bulk_port != config.port
    assert {"name": "bulk", "containerPort": config.bulk_port} in container["ports"]
    service = build_director_service("fed", "ns", FED)["spec"]["ports"]
    bulk = next(p for p in service if p["targetPort"] == "bulk")
    # Collaborators connect to the Service's port that the director advertises: its own.
    assert bulk["port"] == config.bulk_port


@pytest.mark.parametrize("tls", ["insecure", "mtls"])
def test_the_director_readiness_probe_asks_the_plaintext_health_port(tls: str) -> None:
    """The kubelet's grpc probe speaks plaintext only: it asks the port where the director
    serves grpc.health.v1.Health alone, in both TLS modes (never the mTLS gRPC port)."""
    spec = FED.model_copy(update={"tls": tls})
    container = build_director_deployment("fed", "ns", spec)["spec"]["template"]["spec"][
        "containers"][0]
    args = build_parser().parse_args(container["args"])
    assert container["readinessProbe"] == {"grpc": {"port": args.health_port}}
    for probe in ("startupProbe", "livenessProbe"):  # the same port, with patience
        assert container[probe]["grpc"] == {"port": args.health_port}
    assert (container["startupProbe"]["periodSeconds"]
            * container["startupProbe"]["failureThreshold"]) >= 600
    assert (container["livenessProbe"]["periodSeconds"]
            * container["livenessProbe"]["failureThreshold"]) >= 60
    assert {"name": "health", "containerPort": args.health_port} in container["ports"]
    assert args.health_port not in (args.port, args.bulk_port, args.metrics_port)
    assert "health" not in {p["name"] for p in
                            build_director_service("fed", "ns", spec)["spec"]["ports"]}


def test_director_frontends_reach_the_director_command_line() -> None:
    spec = FED.model_copy(update={"director_frontends": 4, "tls": "insecure"})
    args = build_director_deployment("fed", "ns", spec)["spec"]["template"]["spec"][
        "containers"][0]["args"]
    config = director_config(build_parser().parse_args(args))
    assert config.frontends == 4
    assert director_config(build_parser().parse_args(
        build_director_deployment("fed", "ns", FED.model_copy(update={"tls": "insecure"}))[
            "spec"]["template"]["spec"]["containers"][0]["args"])).frontends == 0


def test_owner_limits_reach_the_director_command_line() -> None:
    spec = FED.model_copy(update={"max_queued_per_owner": 7,
                                  "max_stored_bytes_per_owner": 1 << 30, "tls": "insecure"})
    args = build_director_deployment("fed", "ns", spec)["spec"]["template"]["spec"][
        "containers"][0]["args"]
    config = director_config(build_parser().parse_args(args))
    assert (config.max_queued_per_owner, config.max_stored_bytes_per_owner) == (7, 1 << 30)


def test_director_and_envoy_resources_default_to_requests_and_take_the_specs() -> None:
    def container(manifest: dict[str, Any]) -> dict[str, Any]:
        return dict(manifest["spec"]["template"]["spec"]["containers"][0])

    # A CPU for the director and one per frontend; requests only, no limits.
    assert container(build_director_deployment("fed", "ns", FED))["resources"] == {
        "requests": {"cpu": "1", "memory": "1Gi"}}
    with_frontends = FED.model_copy(update={"director_frontends": 4})
    assert container(build_director_deployment("fed", "ns", with_frontends))["resources"] == {
        "requests": {"cpu": "5", "memory": "1Gi"}}
    assert container(build_envoy_daemonset("fed", "ns", FED))["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"}}
    # As given, in the CRD's camelCase too.
    given = FederationSpec.model_validate({
        **FED.model_dump(by_alias=True, exclude_none=True),
        "directorResources": {"requests": {"cpu": "2500m", "memory": "8Gi"},
                              "limits": {"memory": "16Gi"}},
        "envoyResources": {"limits": {"cpu": "1"}}})
    assert container(build_director_deployment("fed", "ns", given))["resources"] == {
        "requests": {"cpu": "2500m", "memory": "8Gi"}, "limits": {"memory": "16Gi"}}
    assert container(build_envoy_daemonset("fed", "ns", given))["resources"] == {
        "limits": {"cpu": "1"}}
    with pytest.raises(ValidationError, match="pattern"):
        ComputeResources(requests={"cpu": "two"})


def test_envoy_daemonset_targets_gpu_nodes() -> None:
    pod = build_envoy_daemonset("fed", "ns", FED)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists",
            "effect": "NoSchedule"} in pod["tolerations"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "/etc/fedkube/envoy/$(NODE_NAME).yaml" in pod["containers"][0]["args"]


def test_envoy_config_per_node() -> None:
    shards = {"a": ShardSpec(federation="fed", node_name="gpu-1", options={"index": "0"}),
              "floating": ShardSpec(federation="fed")}
    data = build_envoy_config("fed", "ns", FED, shards)["data"]
    assert set(data) == {"gpu-1.yaml"}
    config = yaml.safe_load(data["gpu-1.yaml"])
    assert config["name"] == "a" and config["director"] == "fed-director.ns.svc:50051"
    assert config["shard"] == {"loader": "digits", "options": {"index": "0"}}
    # Under mTLS no key travels: the envoy and its collaborator Pods request their own
    # certificate, with only the CA mounted (a public ConfigMap, no shared Secret).
    assert config["tls"] == {"ca": "/etc/fedkube/ca/ca.crt",
                             "cert": "/var/lib/fedkube/tls/tls.crt",
                             "key": "/var/lib/fedkube/tls/tls.key", "request_certificate": True,
                             "certificate_lifetime_s": 90 * 24 * 3600}
    assert config["pod"] == {"ca_config_map": "fed-ca-bundle",
                             "certificate_account": "fed-collaborator"}
    volumes = build_envoy_daemonset("fed", "ns", FED)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "ca", "configMap": {"name": "fed-ca-bundle"}} in volumes
    assert not any("secret" in volume for volume in volumes)


def test_workloads_share_the_federation_labels() -> None:
    kinds = [m["kind"] for m in build_federation_workloads("fed", "ns", FED)]
    assert kinds == ["PersistentVolumeClaim", "Service", "Deployment", "ServiceAccount",
                     "ServiceAccount", "Role", "RoleBinding", "DaemonSet", "NetworkPolicy"]
    for manifest in build_federation_workloads("fed", "ns", FED):
        assert manifest["metadata"]["labels"]["fedkube.io/federation"] == "fed"


def test_federation_names_name_the_objects_it_owns() -> None:
    n = names("fed")
    assert (n.director, n.envoy, n.ca_bundle, n.operator_tls) == (
        "fed-director", "fed-envoy", "fed-ca-bundle", "fed-operator-tls")
    owned = {m["metadata"]["name"] for m in build_federation_workloads("fed", "ns", FED)}
    assert owned == {n.data, n.director, n.envoy, n.collaborator,
                     f"{n.collaborator}-egress"}
    with pytest.raises(AttributeError):  # frozen
        n.director = "other"  # type: ignore[misc]


def test_condition_transition_time_moves_only_on_change() -> None:
    first = set_condition([], "Ready", False, "Queued", at="2026-01-01T00:00:00Z")
    same = set_condition(first, "Ready", False, "StillQueued", at="2026-01-02T00:00:00Z")
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert same[0]["reason"] == "StillQueued"
    flipped = set_condition(same, "Ready", True, "Done", at="2026-01-03T00:00:00Z")
    assert flipped[0]["lastTransitionTime"] == "2026-01-03T00:00:00Z"
    assert len(flipped) == 1


def _report(status: str, **fields: object) -> ExperimentView:
    values: dict[str, object] = dict(name="ns.e", status=status, round=2, total_rounds=5,
                                     metric="accuracy", last_metrics={"accuracy": 0.8},
                                     best_metrics={"accuracy": 0.9}, error="",
                                     queue_position=0, collaborators=["a"])
    values.update(fields)
    return ExperimentView(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("state", "phase", "conditions"), [
    ("pending", "Queued", {"Running": "False", "Ready": "False"}),
    ("in_progress", "Running", {"Running": "True", "Ready": "False"}),
    ("finished", "Succeeded", {"Running": "False", "Succeeded": "True", "Ready": "True"}),
    ("failed", "Failed", {"Running": "False", "Failed": "True", "Ready": "False"}),
])
def test_experiment_status_mapping(state: str, phase: str, conditions: dict[str, str]) -> None:
    transition = build_status({}, _report(state, error="boom" if state == "failed" else ""), 3)
    status = transition.status
    assert status["phase"] == phase and status["progress"] == "2/5"
    assert status["bestMetric"] == 0.9
    assert {c["type"]: c["status"] for c in status["conditions"]} == conditions
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])
    if state == "failed":
        assert transition.final and status["error"] == "boom"
        assert transition.events == [("Warning", "CollaboratorFailed", "boom")]


def test_round_events_only_when_the_round_moves() -> None:
    running = build_status({}, _report("in_progress"), 1).status
    again = build_status(running, _report("in_progress"), 1)
    assert again.events == []
    moved = build_status(running, _report("in_progress", round=3), 1)
    assert [e[1] for e in moved.events] == ["RoundCompleted"]


def test_a_dropped_collaborator_shows_in_status_with_one_warning() -> None:
    running = build_status({}, _report("in_progress"), 1).status
    dropped = build_status(running, _report("in_progress", dropped=["b"]), 1)
    assert dropped.status["droppedCollaborators"] == ["b"]
    assert [(e[0], e[1]) for e in dropped.events] == [("Warning", "CollaboratorDropped")]
    assert "b" in dropped.events[0][2]
    assert build_status(dropped.status, _report("in_progress", dropped=["b"]), 1).events == []


def test_plan_from_spec() -> None:
    spec = ExperimentSpec.model_validate({"federation": "f", "task": "digits-mlp", "rounds": 3,
                                          "params": {"hidden": 8},
                                          "roundTimeoutSeconds": 30})
    plan = build_plan(spec)
    assert (plan.task, plan.rounds, plan.params, plan.round_timeout_s) == (
        "digits-mlp", 3, {"hidden": 8}, 30.0)


def test_shard_status_from_registry() -> None:
    assert build_shard_status({}, None, node="n", generation=1)["online"] is False
    envoy = EnvoyView(name="a", online=True, experiment_running=True, experiment="ns.e",
                      description="d", n_samples=3, sample_shape=["8"], target_shape=["1"],
                      cuda_devices=[{"index": 0, "name": "H100", "memory_total": 80 << 30,
                                     "memory_utilized": 1 << 30, "utilization": "37%"}],
                      last_health_check=1_700_000_000.0)
    status = build_shard_status({}, envoy, node="gpu-1", generation=1)
    assert status["gpus"] == 1 and status["currentExperiment"] == "ns.e"
    assert status["cudaDevices"][0] == {"index": 0, "name": "H100", "memoryTotalMib": 81920,
                                        "memoryUsedMib": 1024, "utilizationPercent": 37}
    assert status["lastHealthCheck"] == "2023-11-14T22:13:20Z"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Registered": "True", "Online": "True", "Ready": "True"}


def test_collaborator_pod_is_pinned_through_the_scheduler(tmp_path: Path) -> None:
    from fedkube.envoy_agent.pods import PodPlacement, build_collaborator_pod
    from fedkube.envoy_agent.runtime import CollaboratorJob

    job = CollaboratorJob(experiment="NS.My_Exp", collaborator="a", archive=tmp_path,
                          work_dir=tmp_path, cuda_devices=(), gpus=0)
    where = PodPlacement(namespace="ns", node_name="gpu-1", image="img", director="d:1",
                         loader="digits", options={"index": "0"}, tls_secret="fed-envoy-tls",
                         owner_pod="envoy-x", owner_uid="uid-1")
    pod = build_collaborator_pod(job, where)
    assert pod["metadata"]["name"].startswith("collab-ns-my-exp-a-")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    spec = pod["spec"]
    assert "nodeName" not in spec
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchFields"][0]["values"] == ["gpu-1"]
    container = spec["containers"][0]
    assert "resources" not in container  # no GPUs asked, none requested
    assert "--insecure" not in container["args"] and "--ca" in container["args"]
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.action, args.log_format) == ("collaborator", "run", "json")
    assert {"name": "tls", "secret": {"secretName": "fed-envoy-tls",
                                      "defaultMode": 0o400}} in spec["volumes"]


def test_collaborator_pod_resources_come_from_the_experiment(tmp_path: Path) -> None:
    from fedkube.envoy_agent.pods import PodPlacement, build_collaborator_pod
    from fedkube.envoy_agent.runtime import CollaboratorJob

    spec = ExperimentSpec.model_validate({
        "federation": "fed", "task": "digits-logreg", "gpusPerCollaborator": 2,
        "collaboratorResources": {"requests": {"cpu": 4, "memory": "16Gi"},
                                  "limits": {"memory": "32Gi"}}})
    plan = build_plan(spec)
    job = CollaboratorJob(experiment="e", collaborator="a", archive=tmp_path,
                          work_dir=tmp_path, cuda_devices=(), gpus=plan.gpus_per_collaborator,
                          resources=plan.collaborator_resources)
    where = PodPlacement(namespace="ns", node_name="gpu-1", image="img", director="d:1",
                         loader="digits", options={})
    container = build_collaborator_pod(job, where)["spec"]["containers"][0]
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"},
                                      "limits": {"memory": "32Gi", "nvidia.com/gpu": "2"}}
    # The plan travels in the experiment's archive, and reads back the same.
    assert read_plan(build_archive(plan)) == plan


def test_collaborator_pod_requests_its_own_certificate(tmp_path: Path) -> None:
    from fedkube.envoy_agent.pods import PodPlacement, build_collaborator_pod
    from fedkube.envoy_agent.runtime import CollaboratorJob

    job = CollaboratorJob(experiment="ns.e", collaborator="a", archive=tmp_path,
                          work_dir=tmp_path, cuda_devices=(), gpus=0)
    where = PodPlacement(namespace="ns", node_name="gpu-1", image="img", director="d:1",
                         loader="digits", options={}, ca_config_map="fed-ca-bundle",
                         certificate_account="fed-collaborator")
    spec = build_collaborator_pod(job, where)["spec"]
    args = spec["containers"][0]["args"]
    assert "--request-certificate" in args and args[args.index("--ca") + 1].startswith(
        "/etc/fedkube/ca/")
    assert spec["serviceAccountName"] == "fed-collaborator"
    assert spec["automountServiceAccountToken"] is True  # its token proves its node
    assert {"name": "ca", "configMap": {"name": "fed-ca-bundle"}} in spec["volumes"]
    assert not any("secret" in volume for volume in spec["volumes"])


# -- the signer of shard certificates ------------------------------------------------------

def _csr_spec(common_name: str = "ward-a", role: str = "envoy", *, node: str | None = "gpu-1",
              account: str = "fed-envoy", **overrides: object) -> dict[str, object]:
    import base64

    from fedkube.transport import certs

    request, _ = certs.make_request(common_name, role=role)
    spec: dict[str, object] = {
        "request": base64.b64encode(request).decode(), "signerName": "fedkube.io/shard",
        "usages": ["client auth", "digital signature"],
        "username": f"system:serviceaccount:ns:{account}",
        "extra": ({} if node is None else {
            "authentication.kubernetes.io/node-name": [node],
            "authentication.kubernetes.io/pod-name": ["fed-envoy-x1"]})}
    spec.update(overrides)
    return spec


SHARDS = {"ward-a": ShardSpec(federation="fed", node_name="gpu-1"),
          "ward-b": ShardSpec(federation="fed", node_name="gpu-2"),
          "elsewhere": ShardSpec(federation="other", node_name="gpu-1")}


@pytest.mark.parametrize(("spec", "reason"), [
    (_csr_spec(), "ShardNodeVerified"),
    (_csr_spec(role="collaborator", account="fed-collaborator"), "ShardNodeVerified"),
    (_csr_spec("ward-b"), "WrongNode"),                       # another node's shard
    (_csr_spec(node=None), "NotBoundToPod"),                  # a token not bound to a Pod
    (_csr_spec(role="admin"), "WrongRole"),                   # more than an envoy may be
    (_csr_spec(role="envoy", account="fed-collaborator"), "WrongRole"),
    (_csr_spec("elsewhere"), "UnknownShard"),                 # another federation's shard
    (_csr_spec("nobody"), "UnknownShard"),
    (_csr_spec(account="default"), "UnknownRequester"),
    (_csr_spec(usages=["server auth"]), "BadUsages"),
    (_csr_spec(request="bm90IGEgcmVxdWVzdA=="), "BadRequest"),
])
def test_signer_signs_a_shard_certificate_only_from_the_shard_node(
        spec: dict[str, object], reason: str) -> None:
    from fedkube.operator.signer import find_requester, review_request

    requester = find_requester(str(spec["username"]), [("ns", "fed"), ("ns", "other")])
    review = review_request(spec, requester, SHARDS)
    assert review.reason == reason, review.message
    assert review.approved is (reason == "ShardNodeVerified")


def test_signed_certificate_carries_the_shard_and_role(tmp_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from fedkube.operator.signer import find_requester, review_request
    from fedkube.transport import certs

    spec = _csr_spec(expirationSeconds=3600)
    review = review_request(spec, find_requester(str(spec["username"]), [("ns", "fed")]),
                            SHARDS)
    assert review.request is not None and review.validity == dt.timedelta(hours=1)
    ca = certs.create_ca()
    cert = x509.load_pem_x509_certificate(certs.sign_request(ca, review.request,
                                                             validity=review.validity))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ward-a"
    assert cert.subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "envoy"
    assert cert.issuer == x509.load_pem_x509_certificate(ca.cert_pem).subject
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(minutes=60) < lifetime <= dt.timedelta(minutes=66)


def test_a_burst_of_render_requests_shares_renders() -> None:
    """50 Shards created at once: their handlers return at once, a few renders run, and
    the last render saw every Shard (none is left with a render that began before it)."""
    import threading
    import time

    from fedkube.operator.coalesce import Coalescer

    coalescer = Coalescer()
    shards: list[int] = []
    renders: list[int] = []
    guard = threading.Lock()

    def render() -> None:
        with guard:
            seen = len(shards)
        time.sleep(0.05)  # a render's API round trips
        renders.append(seen)

    def create_shard(i: int) -> None:
        with guard:
            shards.append(i)
        coalescer.request("fed", render)

    threads = [threading.Thread(target=create_shard, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    coalescer.drain()
    assert renders[-1] == 50 and len(renders) <= 5


def test_a_failed_render_is_retried() -> None:
    from fedkube.dev.processes import wait_for
    from fedkube.operator.coalesce import Coalescer

    coalescer, attempts = Coalescer(retry_after=0.01), []

    def render() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("apiserver unavailable")

    coalescer.request("fed", render)
    wait_for(lambda: coalescer.runs == 1, timeout=10, message="the retried render")
    assert len(attempts) == 2


def test_shard_status_patches_only_what_changed() -> None:
    from fedkube.operator.shards import status_changes

    shown = {"online": True, "lastHealthCheck": "2026-11-25T10:00:00Z", "gpus": 8}
    assert status_changes(shown, {**shown, "lastHealthCheck": "2026-11-25T10:00:30Z"}) == {}
    assert status_changes(shown, {**shown, "lastHealthCheck": "2026-11-25T10:01:00Z"}) == {
        "lastHealthCheck": "2026-11-25T10:01:00Z"}
    assert status_changes(shown, {**shown, "online": False,
                                  "lastHealthCheck": "2026-11-25T10:00:05Z"}) == {
        "online": False}
    assert status_changes({}, shown) == shown


def test_the_longest_names_the_crds_allow_give_valid_unique_objects(tmp_path: Path) -> None:
    """Experiment names up to 253 characters in a 63-character namespace, shard names up to
    253: Pod names, labels and director names stay within their limits and never collide
    (they were cut to 63, so a long experiment gave every shard the same Pod name, as did
    shards `node.1` and `node-1`)."""
    from fedkube.api.names import DNS_LABEL, LABEL_VALUE
    from fedkube.director.core import EXPERIMENT_NAME
    from fedkube.envoy_agent.pods import PodPlacement, build_collaborator_pod
    from fedkube.envoy_agent.runtime import CollaboratorJob
    from fedkube.operator.experiments import director_name

    namespace = "n" * 63
    experiments = ["e" * 253, "e" * 252 + "f", "e" * 51, "short"]
    shards = ["s" * 253, "s" * 252 + "t", "node.1", "node-1", "a"]
    where = PodPlacement(namespace="ns", node_name="gpu-1", image="img", director="d:1",
                         loader="digits", options={}, tls_secret="t", owner_pod="p",
                         owner_uid="u")
    at_director = {director_name(namespace, e) for e in experiments}
    assert len(at_director) == len(experiments)
    assert all(EXPERIMENT_NAME.fullmatch(name) for name in at_director)
    pods = set()
    for experiment in at_director:
        for shard in shards:
            job = CollaboratorJob(experiment=experiment, collaborator=shard, archive=tmp_path,
                                  work_dir=tmp_path, cuda_devices=(), gpus=0)
            metadata = build_collaborator_pod(job, where)["metadata"]
            assert DNS_LABEL.fullmatch(metadata["name"]), metadata["name"]
            assert all(LABEL_VALUE.fullmatch(v) for v in metadata["labels"].values())
            pods.add(metadata["name"])
    assert len(pods) == len(at_director) * len(shards)


def test_two_shards_on_one_node_leave_one_out_said_so_and_bad_node_names_are_refused() -> None:
    """One shard per node: the second no longer silently replaced the first in the envoys'
    ConfigMap (whose keys a bad node name also broke for every shard)."""
    from pydantic import ValidationError

    from fedkube.operator.manifests import node_conflicts

    shards = {"a": ShardSpec(federation="fed", node_name="gpu-1"),
              "b": ShardSpec(federation="fed", node_name="gpu-1"),
              "c": ShardSpec(federation="fed", node_name="gpu-2")}
    data = build_envoy_config("fed", "ns", FED, shards)["data"]
    assert {k: yaml.safe_load(v)["name"] for k, v in data.items()} == {
        "gpu-1.yaml": "a", "gpu-2.yaml": "c"}
    taken = node_conflicts({n: s.node_name for n, s in shards.items()})
    assert taken == {"b": "node 'gpu-1' already serves shard 'a' (one shard per node)"}
    # The left-out one says so in its status, whatever the director's registry says.
    status = build_shard_status({}, None, node="gpu-1", generation=1, node_taken=taken["b"])
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NodeTaken")
    assert "already serves shard 'a'" in ready["message"]
    for bad in ("../x/y:z", "Gpu-1", "gpu_1", "-gpu"):
        with pytest.raises(ValidationError):
            ShardSpec(federation="fed", node_name=bad)
    with pytest.raises(ValidationError):
        FederationSpec.model_validate({**FED.model_dump(by_alias=True),
                                       "sampleShape": ["8", "--insecure"]})


def test_the_shards_policy_reaches_its_envoys_config_whole() -> None:
    policy = {"owners": ["owner:alice"], "approval": "manual", "maxRounds": 20,
              "userCode": True, "maxMemory": "8Gi"}
    shards = {"a": ShardSpec.model_validate({"federation": "fed", "nodeName": "gpu-1",
                                             "policy": policy})}
    config = yaml.safe_load(build_envoy_config("fed", "ns", FED, shards)["data"]["gpu-1.yaml"])
    assert config["policy"] == policy
    from fedkube.api.config import EnvoyConfig

    config["tls"] = {"insecure": True}  # the certificates exist only in the Pod
    assert EnvoyConfig.model_validate(config).policy == ShardSpec.model_validate(
        {"federation": "fed", "policy": policy}).policy
    # No policy: the default (built-in tasks, automatic), said by nothing in the config.
    plain = {"a": ShardSpec(federation="fed", node_name="gpu-1")}
    assert yaml.safe_load(build_envoy_config("fed", "ns", FED, plain)["data"][
        "gpu-1.yaml"])["policy"] == {}
    with pytest.raises(ValidationError):
        ShardSpec.model_validate({"federation": "fed", "policy": {"approval": "sometimes"}})


def test_the_approved_condition_follows_the_shards_review() -> None:
    from fedkube.client.director_client import Review

    both = ["a", "b"]
    waiting = build_status({}, _report("in_progress", collaborators=both, review={
        "a": Review("accepted", "the shard policy allows it"),
        "b": Review("awaiting", "waiting for the data owner's approval")}), 1)
    approved = {c["type"]: c for c in waiting.status["conditions"]}["Approved"]
    assert (approved["status"], approved["reason"]) == ("False", "AwaitingApproval")
    assert approved["message"] == "waiting for the data owners of b"
    assert ("Normal", "AwaitingApproval", "b: waiting for its data owner's approval") in \
        waiting.events
    decided = build_status(waiting.status, _report("in_progress", collaborators=both, review={
        "a": Review("accepted", "the shard policy allows it"),
        "b": Review("refused", "not during the audit")}), 1)
    approved = {c["type"]: c for c in decided.status["conditions"]}["Approved"]
    assert (approved["status"], approved["reason"]) == ("True", "Approved")
    assert "refused by b" in approved["message"]
    # One event per new decision: a's did not change, b's did.
    assert [e[1] for e in decided.events] == ["ShardRefused"]
    again = build_status(decided.status, _report("in_progress", collaborators=both, review={
        "a": Review("accepted", ""), "b": Review("refused", "not during the audit")}), 1)
    assert again.events == []
    assert decided.status["review"]["b"] == {"decision": "refused",
                                             "reason": "not during the audit"}


def test_collaborators_may_reach_only_their_director_and_dns() -> None:
    from fedkube.envoy_agent.pods import PodPlacement, build_collaborator_pod
    from fedkube.envoy_agent.runtime import CollaboratorJob

    policy = build_collaborator_network_policy("fed", "ns")
    pod = build_collaborator_pod(
        CollaboratorJob(experiment="e", collaborator="a", archive=Path("a.zip"),
                        work_dir=Path("w"), cuda_devices=()),
        PodPlacement(namespace="ns", node_name="n", image="i", director="d:1", loader="digits",
                     options={}))
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()  # it selects collaborators
    assert policy["spec"]["ingress"] == []
    to_director, dns = policy["spec"]["egress"]
    director = build_director_deployment("fed", "ns", FED)["spec"]["template"]["metadata"]
    assert to_director["to"][0]["podSelector"]["matchLabels"].items() <= \
        director["labels"].items()
    service_ports = {p["port"] for p in build_director_service("fed", "ns", FED)["spec"]["ports"]}
    assert {p["port"] for p in to_director["ports"]} == service_ports
    assert {p["port"] for p in dns["ports"]} == {53} and "to" not in dns
    # And the Pod itself keeps Pod Security `restricted` with no token it does not need.
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
