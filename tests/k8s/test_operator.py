"""The operator against the real control plane: CRDs, validation, a Federation's
workloads placed by the scheduler, and an Experiment driven to Succeeded through a
director and envoys running as local processes (KWOK nodes run no containers)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedkube.dev.cluster import ControlPlane
from fedkube.dev.processes import Process, director_process, envoy_process, free_port, wait_for
from tests.helpers import restricted_namespace, scrape

pytestmark = pytest.mark.k8s
ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "fl-test"


@dataclass
class Operated:
    cluster: ControlPlane
    director_port: int
    operator: Process
    metrics_port: int

    def kubectl(self, *args: str, input: str | None = None, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl("-n", NAMESPACE, *args, input=input, check=check)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, *documents: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents))

    def row(self, kind: str, name: str) -> dict[str, str]:
        """`kubectl get KIND NAME` as {COLUMN: value} (values without spaces)."""
        header, line = self.kubectl("get", kind, name).stdout.splitlines()[:2]
        return dict(zip(header.split(), line.split(), strict=False))

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.get("events", "--field-selector", f"involvedObject.name={name}")["items"]
        return list(items)

    def not_accepted(self, experiment: str, reason: str, text: str) -> bool:
        """Whether the experiment has Accepted=False for reason, its message naming text."""
        conditions = self.get("experiment", experiment).get("status", {}).get(
            "conditions", [])
        return any(c["type"] == "Accepted" and c["status"] == "False"
                   and c["reason"] == reason and text in c["message"] for c in conditions)


def examples(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy" / name).read_text()) if d]


@pytest.fixture(scope="module")
def operated(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Operated]:
    work = tmp_path_factory.mktemp("operated")
    restricted_namespace(cluster, NAMESPACE)
    port = free_port()
    processes = [director_process(work, port, period=1.0).start()]
    for index, shard in enumerate(("hospital-a", "hospital-b")):
        processes.append(envoy_process(work, shard, port, index=index, count=2).start())
    metrics_port = free_port()
    operator = Process("operator", ["operator", "run", "--namespace", NAMESPACE,
                                    "--metrics-port", str(metrics_port)],
                       work / "logs" / "operator.log",
                       env={"KUBECONFIG": str(cluster.kubeconfig)}).start()
    processes.append(operator)
    try:
        yield Operated(cluster, port, operator, metrics_port)
    finally:
        for process in processes:
            process.stop()
        for process in processes:
            print(f"----- {process.name} -----\n{process.output()[-4000:]}")
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def _local_federation(operated: Operated) -> dict[str, Any]:
    """deploy/federation.yaml, pointed at the director running as a local process."""
    federation = examples("federation.yaml")[0]
    federation["spec"].update(tls="insecure",
                              directorEndpoint=f"localhost:{operated.director_port}")
    return federation


def test_invalid_specs_are_refused_by_the_apiserver(operated: Operated) -> None:
    bad = examples("experiment.yaml")[0]
    bad["metadata"]["name"] = "bad"
    bad["spec"].update(rounds=0, task="x" * 300)
    result = operated.kubectl("apply", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert result.returncode != 0
    assert "spec.rounds" in result.stderr and "greater than or equal to 1" in result.stderr
    assert "spec.task: Too long: may not be more than 200" in result.stderr
    # CEL rules run once the schema passes.
    bad = examples("experiment.yaml")[0]
    bad["metadata"]["name"] = "bad"
    bad["spec"]["minCollaborators"] = 3
    result = operated.kubectl("apply", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert result.returncode != 0
    assert "minCollaborators must not exceed the number of shards listed" in result.stderr
    bad_fed = examples("federation.yaml")[0]
    bad_fed["spec"].update(tls="plaintext", storage="lots",
                           directorResources={"requests": {"cpu": "two"}})
    result = operated.kubectl("apply", "-f", "-", input=yaml.safe_dump(bad_fed), check=False)
    assert result.returncode != 0
    assert 'supported values: "mtls", "insecure"' in result.stderr
    assert "spec.storage" in result.stderr
    assert "spec.directorResources.requests.cpu" in result.stderr
    # A shape item becomes a director flag; a node name keys the envoys' ConfigMap.
    bad_fed = examples("federation.yaml")[0]
    bad_fed["spec"]["sampleShape"] = ["8", "--insecure"]
    result = operated.kubectl("apply", "-f", "-", input=yaml.safe_dump(bad_fed), check=False)
    assert result.returncode != 0 and "spec.sampleShape[1]" in result.stderr
    bad_shard = examples("shard.yaml")[0]
    bad_shard["spec"]["nodeName"] = "../x/y:z"
    result = operated.kubectl("apply", "-f", "-", input=yaml.safe_dump(bad_shard),
                              check=False)
    assert result.returncode != 0 and "spec.nodeName" in result.stderr


def test_the_crds_explain_their_fields(operated: Operated) -> None:
    def explained() -> str:
        result = operated.cluster.kubectl("explain", "experiment.spec.rounds", check=False)
        return result.stdout if result.returncode == 0 else ""

    wait_for(lambda: "training rounds" in explained(), timeout=60,
             message="kubectl explain experiment.spec.rounds describes it")
    assert "<no description>" not in explained()
    spec = operated.cluster.kubectl("explain", "federation.spec").stdout
    assert "<no description>" not in spec, spec


def test_waiting_experiments_say_why_once_and_delete_at_once(operated: Operated) -> None:
    """An Experiment of a missing Federation and one whose director does not answer: the
    reason in `kubectl get`, one Event each however often the operator retries, and a
    deletion that does not wait for a director that never accepted them."""
    silent = examples("federation.yaml")[0]
    silent["metadata"]["name"] = "silent"
    silent["spec"].update(tls="insecure", directorEndpoint=f"localhost:{free_port()}")
    orphan = examples("experiment.yaml")[0]
    orphan["metadata"]["name"] = "orphan"
    orphan["spec"]["federation"] = "nowhere"
    unheard = examples("experiment.yaml")[0]
    unheard["metadata"]["name"] = "unheard"
    unheard["spec"]["federation"] = "silent"
    started = time.monotonic()
    operated.apply(silent, orphan, unheard)

    wait_for(lambda: operated.not_accepted("orphan", "FederationNotFound", "nowhere"),
             timeout=60, message="Accepted=False FederationNotFound")
    wait_for(lambda: operated.not_accepted("unheard", "DirectorUnreachable", "UNAVAILABLE"),
             timeout=60, message="Accepted=False DirectorUnreachable")
    assert operated.row("experiment", "orphan")["REASON"] == "FederationNotFound"
    assert operated.row("experiment", "unheard")["REASON"] == "DirectorUnreachable"
    # The Federation says so too: its director does not answer.
    wait_for(lambda: operated.row("federation", "silent").get("REASON")
             == "DirectorUnreachable", timeout=60, message="Federation Ready=False")
    assert operated.row("federation", "silent")["READY"] == "False"
    # The operator retries every few seconds; the Events do not multiply.
    time.sleep(max(0.0, 22 - (time.monotonic() - started)))
    for name, reason in (("orphan", "FederationNotFound"), ("unheard", "DirectorUnreachable")):
        events = operated.events(name)
        assert [e["reason"] for e in events] == [reason], events
    assert operated.operator.running
    for name in ("orphan", "unheard"):
        began = time.monotonic()
        operated.kubectl("delete", "experiment", name, "--wait=true", "--timeout=15s")
        assert time.monotonic() - began < 15
    operated.kubectl("delete", "federation", "silent", "--wait=true", "--timeout=60s")
    log = operated.operator.output()
    assert "_InactiveRpcError" not in log
    assert "Timer 'follow_experiments' succeeded" not in log
    assert "failed temporarily" not in "".join(
        line for line in log.splitlines() if "ERROR" in line)


def test_a_federation_whose_director_cannot_schedule_is_not_ready(operated: Operated
                                                                  ) -> None:
    """Its manifests applied, its director's Pod Pending: not Ready, with the scheduler's
    reason in `kubectl get federation` and its message in the condition."""
    stuck = examples("federation.yaml")[0]
    stuck["metadata"]["name"] = "stuck"
    stuck["spec"].update(tls="insecure", directorResources={"requests": {"cpu": "500"}})
    operated.apply(stuck)
    wait_for(lambda: operated.row("federation", "stuck").get("REASON") == "Unschedulable",
             timeout=90, message="Federation Ready=False Unschedulable")
    assert operated.row("federation", "stuck")["READY"] == "False"
    conditions = {c["type"]: c for c in operated.get("federation", "stuck")["status"][
        "conditions"]}
    assert conditions["DirectorAvailable"]["status"] == "False"
    assert "nodes are available" in conditions["Ready"]["message"]
    assert "Unschedulable" in [e["reason"] for e in operated.events("stuck")]
    operated.kubectl("delete", "federation", "stuck", "--wait=true", "--timeout=60s")


def test_experiment_waits_for_unregistered_shards(operated: Operated) -> None:
    operated.apply(_local_federation(operated))
    early = examples("experiment.yaml")[0]
    early["metadata"]["name"] = "early"
    early["spec"].update(shards=["hospital-z"], minCollaborators=1)
    operated.apply(early)

    wait_for(lambda: operated.not_accepted("early", "ShardsNotRegistered", "hospital-z"),
             timeout=60, message="Accepted=False ShardsNotRegistered")
    operated.kubectl("delete", "experiment", "early", "--wait=true", "--timeout=60s")


def test_federation_workloads_and_gpu_placement(operated: Operated) -> None:
    federation = _local_federation(operated)
    # `cpu: 2` in YAML is an integer, as Pod specs allow.
    federation["spec"]["directorResources"] = {"requests": {"cpu": 2, "memory": "2Gi"}}
    operated.apply(federation)
    wait_for(lambda: operated.kubectl("get", "daemonset", "digits-envoy",
                                      check=False).returncode == 0,
             timeout=60, message="envoy DaemonSet")
    deployment = operated.get("deployment", "digits-director")
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "2Gi"}}
    envoy = operated.get("daemonset", "digits-envoy")["spec"]["template"]["spec"]
    assert envoy["containers"][0]["resources"] == {"requests": {"cpu": "100m",
                                                                "memory": "256Mi"}}
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "Federation"
    service = operated.get("service", "digits-director")
    assert service["spec"]["ports"][0]["port"] == 50051
    assert operated.get("pvc", "digits-director-data")["spec"]["resources"]["requests"][
        "storage"] == "1Gi"

    def envoy_nodes() -> set[str]:
        pods = operated.get("pods", "-l", "app.kubernetes.io/component=envoy")["items"]
        return {p["spec"].get("nodeName", "") for p in pods
                if p.get("status", {}).get("phase") == "Running"}

    wait_for(lambda: envoy_nodes() == {"gpu-node-1", "gpu-node-2"}, timeout=60,
             message="envoy pods running on the two GPU nodes only")
    status = operated.get("federation", "digits")["status"]
    assert status["directorEndpoint"] == f"localhost:{operated.director_port}"
    # The director's Pod too was admitted in the restricted namespace.
    wait_for(lambda: len(operated.get("pods", "-l", "app.kubernetes.io/component=director")[
        "items"]) == 1, timeout=60, message="director pod admitted")
    events = operated.kubectl("get", "events", "--field-selector", "reason=FailedCreate",
                              "-o", "name").stdout
    assert events.strip() == "", events


ENVOY_ACCOUNT = "system:serviceaccount:fl-test:digits-envoy"


@pytest.mark.parametrize(("verb", "resource", "allowed"), [
    ("create", "pods", True),
    ("delete", "pods", True),
    ("watch", "pods", True),
    ("get", "pods --subresource=log", True),
    ("create", "pods --subresource=exec", False),
    ("get", "secrets", False),
    ("list", "secrets", False),
    ("create", "deployments.apps", False),
    ("patch", "experiments.fedkube.io", False),
    ("get", "shards.fedkube.io", True),  # its data owner's answers, in annotations
    ("patch", "shards.fedkube.io", False),
    ("list", "nodes", False),
    ("create", "pods -n default", False),
])
def test_envoy_rbac_is_least_privilege(operated: Operated, verb: str, resource: str,
                                       allowed: bool) -> None:
    wait_for(lambda: operated.kubectl("get", "rolebinding", "digits-envoy",
                                      check=False).returncode == 0,
             timeout=60, message="envoy RBAC applied")
    assert operated.cluster.can_i(verb, resource, user=ENVOY_ACCOUNT,
                                  namespace=NAMESPACE) is allowed


def test_mtls_federation_gets_certificates(operated: Operated) -> None:
    secure = examples("federation.yaml")[0]
    secure["metadata"]["name"] = "secure"
    operated.apply(secure)
    wait_for(lambda: operated.kubectl("get", "secret", "secure-operator-tls",
                                      check=False).returncode == 0,
             timeout=60, message="certificates issued")
    for secret in ("secure-ca", "secure-director-tls", "secure-operator-tls"):
        data = operated.get("secret", secret)["data"]
        assert set(data) == {"ca.crt", "tls.crt", "tls.key"}
        # Secrets are never logged, neither as PEM nor as the base64 the API carries.
        log = operated.operator.output()
        assert data["tls.key"][:40] not in log and "PRIVATE KEY" not in log
    # Envoys get no shared key: only the CA, and they request their own certificate
    # (tests/k8s/test_shard_certificates.py).
    assert "secure-envoy-tls" not in operated.kubectl("get", "secrets", "-o", "name").stdout
    assert set(operated.get("configmap", "secure-ca-bundle")["data"]) == {"ca.crt"}
    director = operated.get("deployment", "secure-director")
    args = director["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--ca" in args and "--insecure" not in args
    # A spec change rolls through to the Deployment...
    operated.kubectl("patch", "federation", "secure", "--type=merge",
                     "-p", '{"spec": {"healthCheckPeriodSeconds": 30}}')

    def period() -> str:
        container = operated.get("deployment", "secure-director")["spec"]["template"][
            "spec"]["containers"][0]
        return str(container["args"][container["args"].index("--health-check-period") + 1])

    wait_for(lambda: period() == "30", timeout=60, message="new period in the Deployment")
    # ...and deleting the Federation removes what it owns: owner references and the
    # garbage collector, which may first spend up to 30 s discovering the new CRDs.
    operated.kubectl("delete", "federation", "secure", "--wait=true", "--timeout=60s")
    wait_for(lambda: operated.kubectl("get", "deployment,daemonset,service", "-l",
                                      "fedkube.io/federation=secure", "-o", "name"
                                      ).stdout.strip() == "",
             timeout=120, message="the federation's workloads garbage-collected")


def test_shards_say_why_they_are_not_ready(operated: Operated) -> None:
    """A Shard of a missing Federation, and one whose director does not answer, each get
    Ready=False with the reason (the per-Federation poll's error path)."""
    unreachable = examples("federation.yaml")[0]
    unreachable["metadata"]["name"] = "unreachable"
    unreachable["spec"].update(tls="insecure", directorEndpoint=f"localhost:{free_port()}")
    shards = [{"apiVersion": "fedkube.io/v1alpha1", "kind": "Shard",
               "metadata": {"name": name},
               "spec": {"federation": federation, "nodeName": "cpu-node-1"}}
              for name, federation in (("stray", "nowhere"), ("cut-off", "unreachable"))]
    operated.apply(unreachable, *shards)

    def ready_reason(shard: str) -> str | None:
        conditions = operated.get("shard", shard).get("status", {}).get("conditions", [])
        return next((c["reason"] for c in conditions
                     if c["type"] == "Ready" and c["status"] == "False"), None)

    wait_for(lambda: ready_reason("stray") == "FederationNotFound", timeout=60,
             message="Ready=False FederationNotFound")
    wait_for(lambda: ready_reason("cut-off") == "DirectorUnreachable", timeout=60,
             message="Ready=False DirectorUnreachable")
    # kubectl get says so, and where each shard is, whatever its status.
    for shard, reason in (("stray", "FederationNotFound"), ("cut-off", "DirectorUnreachable")):
        row = operated.row("shard", shard)
        assert (row["READY"], row["REASON"], row["NODE"]) == ("False", reason, "cpu-node-1")
    operated.kubectl("delete", "shard", "stray", "cut-off", "--wait=true", "--timeout=60s")
    operated.kubectl("delete", "federation", "unreachable", "--wait=true", "--timeout=60s")
    wait_for(lambda: operated.kubectl("get", "deployment,daemonset", "-l",
                                      "fedkube.io/federation=unreachable", "-o", "name"
                                      ).stdout.strip() == "",
             timeout=120, message="the federation's workloads garbage-collected")


def test_experiment_runs_to_succeeded(operated: Operated) -> None:
    operated.apply(_local_federation(operated), *examples("shard.yaml"))

    def shards_online() -> bool:
        items = operated.get("shards")["items"]
        return len(items) == 2 and all(s.get("status", {}).get("online") for s in items)

    wait_for(shards_online, timeout=60, message="both shards Online")
    # The federation's director answers (at its directorEndpoint: a local process here,
    # while the Deployment's Pod waits for a volume no provisioner makes).
    wait_for(lambda: operated.row("federation", "digits").get("REASON")
             == "DirectorAnswering", timeout=60, message="Federation Ready=True")
    assert operated.row("federation", "digits")["READY"] == "True"
    table = operated.kubectl("get", "shards").stdout
    assert "hospital-a" in table and "true" in table and "gpu-node-1" in table
    config = operated.get("configmap", "digits-envoy-config")["data"]
    assert yaml.safe_load(config["gpu-node-1.yaml"])["name"] == "hospital-a"

    operated.apply(*examples("experiment.yaml"))
    operated.kubectl("wait", "--for=condition=Succeeded", "experiment/digits-logreg",
                     "--timeout=120s")
    experiment = operated.get("experiment", "digits-logreg")
    status = experiment["status"]
    assert status["round"] == status["totalRounds"] == 5
    assert status["bestMetric"] > 0.8
    types = {c["type"]: c for c in status["conditions"]}
    assert types["Accepted"]["status"] == types["Ready"]["status"] == "True"
    assert types["Running"]["status"] == "False"
    assert all(c["observedGeneration"] == experiment["metadata"]["generation"]
               for c in status["conditions"])
    table = operated.kubectl("get", "experiments").stdout
    header, row = table.splitlines()[:2]
    assert header.split()[:6] == ["NAME", "READY", "STATUS", "REASON", "ROUND", "METRIC"]
    assert row.split()[:5] == ["digits-logreg", "True", "Succeeded", "Succeeded", "5/5"]
    reasons = {e["reason"] for e in operated.get(
        "events", "--field-selector", "involvedObject.name=digits-logreg")["items"]}
    assert {"Submitted", "Started", "Succeeded"} <= reasons
    # Deleting the Experiment removes its data from the director (the finalizer's work).
    operated.kubectl("delete", "experiment", "digits-logreg", "--timeout=60s")
    from fedkube.client import DirectorClient

    with DirectorClient(f"localhost:{operated.director_port}", client_id="fedkube-operator"
                        ) as client:
        assert f"{NAMESPACE}.digits-logreg" not in {e[0] for e in client.experiments()}


def test_unschedulable_collaborator_pod_fails_the_experiment(operated: Operated,
                                                              tmp_path: Path) -> None:
    """The whole chain: an envoy with the pod runtime asks for 6 GPUs and 512Gi on a 4-GPU
    node of 256Gi (the Experiment's gpusPerCollaborator and collaboratorResources, through
    its plan); the scheduler leaves the Pod Pending; the envoy reports the failure to the
    director; the operator marks the Experiment Failed with the scheduler's reason."""
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump({
        "name": "hospital-c", "director": f"localhost:{operated.director_port}",
        "shard": {"loader": "digits", "options": {"index": 0, "count": 2}},
        "runtime": "pod", "work_dir": str(tmp_path / "work"), "tls": {"insecure": True},
        "pod": {"namespace": NAMESPACE, "node_name": "gpu-node-2", "image": "fedkube:test",
                "unschedulable_after_s": 2}}))
    envoy = Process("hospital-c", ["envoy", "start", "--config", str(config)],
                    tmp_path / "hospital-c.log",
                    env={"KUBECONFIG": str(operated.cluster.kubeconfig)}).start()
    try:
        operated.apply(_local_federation(operated), {
            "apiVersion": "fedkube.io/v1alpha1", "kind": "Shard",
            "metadata": {"name": "hospital-c"},
            "spec": {"federation": "digits", "nodeName": "gpu-node-2"}})
        hungry = examples("experiment.yaml")[0]
        hungry["metadata"]["name"] = "gpu-hungry"
        hungry["spec"].update(shards=["hospital-c"], minCollaborators=1, rounds=1,
                              gpusPerCollaborator=6,
                              collaboratorResources={"requests": {"memory": "512Gi"}})
        operated.apply(hungry)
        operated.kubectl("wait", "--for=condition=Failed", "experiment/gpu-hungry",
                         "--timeout=120s")
        status = operated.get("experiment", "gpu-hungry")["status"]
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "CollaboratorFailed"
        assert "cannot be scheduled on gpu-node-2" in failed["message"]
        assert "Insufficient nvidia.com/gpu" in failed["message"]
        assert "Insufficient memory" in failed["message"]
        assert status["phase"] == "Failed"
        # The Pending Pod was cleaned up by its envoy.
        wait_for(lambda: not operated.get("pods", "-l",
                                          "fedkube.io/collaborator=hospital-c")["items"],
                 timeout=60, message="collaborator pod deleted")
    finally:
        envoy.stop()
        print(f"----- hospital-c -----\n{envoy.output()[-4000:]}")


def test_an_experiment_waits_for_its_data_owner_who_refuses_by_annotation(
        operated: Operated, tmp_path: Path) -> None:
    """A shard whose policy says `approval: manual`: the Experiment says Approved=False
    AwaitingApproval naming it, until its data owner annotates the Shard; the refusal's
    reason reaches the Experiment's status and Events."""
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump({
        "name": "hospital-d", "director": f"localhost:{operated.director_port}",
        "shard": {"loader": "digits", "options": {"index": 0, "count": 2}},
        "work_dir": str(tmp_path / "work"), "tls": {"insecure": True},
        "shard_namespace": NAMESPACE, "policy": {"approval": "manual"}}))
    envoy = Process("hospital-d", ["envoy", "start", "--config", str(config)],
                    tmp_path / "hospital-d.log",
                    env={"KUBECONFIG": str(operated.cluster.kubeconfig)}).start()
    try:
        operated.apply(_local_federation(operated), {
            "apiVersion": "fedkube.io/v1alpha1", "kind": "Shard",
            "metadata": {"name": "hospital-d"},
            "spec": {"federation": "digits", "policy": {"approval": "manual"}}})
        asking = examples("experiment.yaml")[0]
        asking["metadata"]["name"] = "consent"
        asking["spec"].update(shards=["hospital-d"], minCollaborators=1, rounds=1)
        operated.apply(asking)

        def approved() -> dict[str, Any]:
            conditions = operated.get("experiment", "consent").get("status", {}).get(
                "conditions", [])
            return next((c for c in conditions if c["type"] == "Approved"), {})

        wait_for(lambda: approved().get("reason") == "AwaitingApproval", timeout=90,
                 message="Approved=False AwaitingApproval")
        assert approved()["status"] == "False" and "hospital-d" in approved()["message"]
        assert operated.get("experiment", "consent")["status"]["round"] == 0
        operated.kubectl("annotate", "shard", "hospital-d",
                         f"fedkube.io/refuse={NAMESPACE}.consent",
                         "fedkube.io/reason=our ethics board said no")
        operated.kubectl("wait", "--for=condition=Failed", "experiment/consent",
                         "--timeout=90s")
        status = operated.get("experiment", "consent")["status"]
        assert "hospital-d: our ethics board said no" in status["error"]
        assert status["review"]["hospital-d"] == {"decision": "refused",
                                                  "reason": "our ethics board said no"}
        reasons = [e["reason"] for e in operated.get(
            "events", "--field-selector", "involvedObject.name=consent")["items"]]
        assert "AwaitingApproval" in reasons and "ShardRefused" in reasons
        operated.kubectl("delete", "experiment", "consent", "--wait=true", "--timeout=60s")
    finally:
        envoy.stop()
        print(f"----- hospital-d -----\n{envoy.output()[-4000:]}")


def test_operator_metrics_move(operated: Operated) -> None:
    """Runs last: the tests above reconciled federations, shards and experiments."""

    samples = scrape(operated.metrics_port)

    def total(name: str, **labels: str) -> float:
        return sum(value for (n, labelled), value in samples.items()
                   if n == name and labels.items() <= dict(labelled).items())

    for kind in ("Federation", "Shard", "Experiment"):
        assert total("fedkube_operator_reconciles_total", kind=kind) > 0, kind
    assert total("fedkube_operator_reconcile_seconds_count", kind="Experiment") > 0
    # The experiment of a missing federation was retried: its errors are counted.
    assert total("fedkube_operator_reconcile_errors_total", kind="Experiment",
                 error="TemporaryError") > 0
    assert total("fedkube_operator_experiment_transitions_total", phase="Succeeded") >= 1
