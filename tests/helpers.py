"""Helpers the tests share: directors and federations to run, stubs and requests, the docs'
scripts. Fixtures are in conftest.py; no test module imports another."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import re
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import yaml
from google.protobuf.descriptor import MethodDescriptor
from prometheus_client.parser import text_string_to_metric_families

from fedkube.aggregator.experiment import ExperimentAggregator
from fedkube.api.config import DirectorConfig, TLSSettings
from fedkube.api.plan import Plan
from fedkube.client import DirectorClient, EnvoyView, experiment_archive
from fedkube.dev.processes import Process, director_process, envoy_process, free_port, wait_for
from fedkube.director.frontend_pool import stop_frontend
from fedkube.director.server import DirectorServer
from fedkube.proto import (
    aggregator_pb2,
    base_pb2,
    director_pb2,
    director_pb2_grpc,
    review_pb2,
    streaming_pb2,
)
from fedkube.transport.channel import open_channel
from fedkube.transport.tensors import to_named_tensor
from fedkube.transport.tls import TLSFiles

if TYPE_CHECKING:
    from fedkube.dev.cluster import ControlPlane

ROOT = Path(__file__).resolve().parents[1]

# -- paths and the docs' scripts -------------------------------------------------------

QUICKSTART = ROOT / "docs" / "quickstart.md"
EXAMPLES = ROOT / "examples"


def bash_blocks(path: Path, section: str) -> list[str]:
    """The lines of the ```bash blocks under the '## ' heading that starts with section."""
    text = path.read_text()
    start = text.index(f"\n## {section}")
    end = text.find("\n## ", start + 1)
    body = text[start:end if end >= 0 else None]
    return [line for block in re.findall(r"```bash\n(.*?)```", body, re.S)
            for line in block.splitlines() if line.strip()]


def run_script(lines: list[str], cwd: Path, env: dict[str, str], timeout: float
               ) -> subprocess.CompletedProcess[str]:
    """The lines as one bash script; background processes are stopped at its end."""
    script = "\n".join(["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT",
                        *lines])
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def load_example(path: Path) -> ModuleType:
    """An example's task module, loaded from its file as the collaborator loads it."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- directors in this process ---------------------------------------------------------

def served_rpcs() -> list[tuple[str, MethodDescriptor]]:
    """Every RPC the director's port serves, as (path, method descriptor)."""
    found = []
    for module, service in ((director_pb2, "Director"), (aggregator_pb2, "Aggregator"),
                            (streaming_pb2, "TensorStream"), (review_pb2, "Review")):
        descriptor = module.DESCRIPTOR.services_by_name[service]
        found += [(f"/{descriptor.full_name}/{method.name}", method)
                  for method in descriptor.methods]
    return found


@dataclass(frozen=True)
class CertDir:
    path: Path

    def settings(self, name: str) -> TLSSettings:
        return TLSSettings(ca=self.path / "ca.crt", cert=self.path / f"{name}.crt",
                           key=self.path / f"{name}.key")


@dataclass
class RunningDirector:
    server: DirectorServer
    port: int | None = None  # where tests call it, when not its own port

    @property
    def address(self) -> str:
        return f"localhost:{self.port or self.server.port}"


async def start_director(tmp: Path, *, tls: TLSSettings, period: float = 2.0,
                         sample_shape: list[str] | None = None,
                         frontends: int = 0) -> RunningDirector:
    config = DirectorConfig(host="127.0.0.1", port=0, data_dir=tmp / "director",
                            sample_shape=sample_shape or ["8", "8"], target_shape=["1"],
                            health_check_period=period, tls=tls, frontends=frontends)
    server = DirectorServer(config)
    await server.start()
    return RunningDirector(server)


@contextlib.asynccontextmanager
async def running_director(tmp: Path, *, tls: TLSSettings,
                           route: str = "direct") -> AsyncIterator[RunningDirector]:
    running = await start_director(tmp, tls=tls, frontends=int(route == "frontend"))
    frontend = None
    try:
        if route == "frontend":
            assert running.server.frontends is not None
            running.port = free_port()
            frontend = await running.server.frontends.spawn(running.port)
        yield running
    finally:
        if frontend is not None:
            await stop_frontend(frontend)
        await running.server.stop(None)


async def eventually(predicate: Callable[[], bool], *, within: float, message: str) -> None:
    """wait_for for a condition that this event loop's director must bring about."""
    try:
        async with asyncio.timeout(within):
            # Polled: the director's state signals nothing when it changes.
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise TimeoutError(f"timed out after {within}s waiting for {message}") from None


# -- calls, requests and results -------------------------------------------------------

def shard_request(name: str, sample: tuple[str, ...] = ("8", "8")
                  ) -> director_pb2.UpdateShardInfoRequest:
    return director_pb2.UpdateShardInfoRequest(shard_info=director_pb2.ShardInfo(
        node_info=director_pb2.NodeInfo(name=name), shard_description="test shard",
        n_samples=100_000, sample_shape=sample, target_shape=["1"]))


def stub(address: str, *, client_id: str = "alice",
         tls: TLSFiles | None = None) -> director_pb2_grpc.DirectorAsyncStub:
    channel = open_channel(address, tls=tls, client_id=client_id)
    client = director_pb2_grpc.DirectorStub(channel)
    client.channel = channel  # type: ignore[attr-defined]  # a stub alone lets its channel close
    return client


def task_results(sender: str, *, round_number: int = 0,
                 tensors: list[base_pb2.NamedTensor] | None = None, task: str = "train",
                 experiment: str = "exp") -> aggregator_pb2.TaskResults:
    """A digits-logreg training result for round 0 of `experiment`."""
    good = [to_named_tensor("weights", np.ones((64, 10))), to_named_tensor("bias",
                                                                           np.ones(10))]
    return aggregator_pb2.TaskResults(
        header=aggregator_pb2.MessageHeader(sender=sender, federation_uuid=experiment),
        round_number=round_number, task_name=task, data_size=10,
        tensors=good if tensors is None else tensors)


def bad_results() -> list[tuple[aggregator_pb2.TaskResults, grpc.StatusCode, str]]:
    """Results an aggregator must refuse, with the status and a part of its message."""
    results = task_results
    nan = np.ones((64, 10))
    nan[3, 3] = np.nan
    return [
        (results("mallory"), grpc.StatusCode.PERMISSION_DENIED, "not a collaborator"),
        (results("env1", round_number=5), grpc.StatusCode.INVALID_ARGUMENT, "round 5"),
        (results("env1", tensors=[to_named_tensor("weights", np.ones((64, 10)))]),
         grpc.StatusCode.INVALID_ARGUMENT, "expected tensors"),
        (results("env1", tensors=[to_named_tensor("weights", np.ones((10, 64))),
                                  to_named_tensor("bias", np.ones(10))]),
         grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (results("env1", tensors=[base_pb2.NamedTensor(name="weights", data_bytes=b"\x00" * 7),
                                  to_named_tensor("bias", np.ones(10))]),
         grpc.StatusCode.INVALID_ARGUMENT, "float32"),
        (results("env1", tensors=[to_named_tensor("weights", nan),
                                  to_named_tensor("bias", np.ones(10))]),
         grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
        (results("env1", tensors=[to_named_tensor("weights", np.full((64, 10), np.inf)),
                                  to_named_tensor("bias", np.ones(10))]),
         grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
    ]


async def running_experiment(director: RunningDirector, cert_dir: CertDir | None = None,
                             name: str = "exp") -> ExperimentAggregator:
    """A digits-logreg experiment of env1 and env2 (under mTLS when given the test
    certificates), submitted by alice and running; its aggregator."""
    def client(who: str) -> director_pb2_grpc.DirectorAsyncStub:
        tls = TLSFiles.from_dir(cert_dir.path, who) if cert_dir else None
        return stub(director.address, client_id=who, tls=tls)

    for shard in ("env1", "env2"):
        envoy = client(shard)  # held: a stub alone lets its channel close
        assert (await envoy.UpdateShardInfo(shard_request(shard))).accepted
    archive, initial = experiment_archive(Plan(task="digits-logreg", rounds=2))
    owner = client("alice")

    async def messages() -> AsyncIterator[director_pb2.ExperimentInfo]:
        yield director_pb2.ExperimentInfo(
            name=name, collaborator_names=["env1", "env2"], model_proto=initial,
            experiment_data=director_pb2.ExperimentData(size=len(archive), npbytes=archive))

    assert (await owner.SetNewExperiment(messages())).accepted
    return director.server.runner.aggregator(name)


# -- directors and envoys as processes -------------------------------------------------

# Read by the tests' slow task: the slow machine of a straggler, not a synchronisation.
DELAY_ENV = "FEDKUBE_TEST_TRAIN_DELAY_S"
# Trains like digits-logreg, after an optional delay read from the envoy's environment:
# the slow machine of a straggler, not a synchronisation.
SLOW_TASK = b'''
import os, time
from fedkube.tasks.models import logreg_init as init_model, logreg_validate as validate
from fedkube.tasks.models import logreg_train

def train(model, data, params):
    time.sleep(float(os.environ.get("FEDKUBE_TEST_TRAIN_DELAY_S", "0")))
    return logreg_train(model, data, params)
'''


def start(processes: list[Process], process: Process) -> Process:
    processes.append(process.start())
    return process


def write_policy(tmp_path: Path, policy: dict[str, Any], name: str = "policy") -> Path:
    """A shard policy file (fedkube.api.policy) for `fedkube envoy start --policy`."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


# The tests' experiments use their own tasks (SLOW_TASK, broken ones) and requirements, and
# tell their tasks how long to train through DELAY_ENV: their data owner allows that.
USER_CODE_POLICY: dict[str, Any] = {"userCode": True, "requirements": True,
                                    "passEnv": ["FEDKUBE_TEST_TRAIN_DELAY_S"]}


def start_federation(tmp_path: Path, processes: list[Process], envoys: int, *,
                     delays: dict[int, float] | None = None,
                     policy: dict[str, Any] | None = None) -> tuple[int, DirectorClient,
                                                                    list[Process]]:
    """A director and envoys env0..env{n-1} on digits shards as real processes, all online;
    its port, a client as owner alice, and the envoys. `delays` slows envoys' training
    (seconds, by index) for tasks that read DELAY_ENV; the envoys' shard policy is
    USER_CODE_POLICY unless given."""
    port = free_port()
    processes.append(director_process(tmp_path, port, period=1.0).start())
    policy_file = write_policy(tmp_path, USER_CODE_POLICY if policy is None else policy)
    started = []
    for i in range(envoys):
        envoy = envoy_process(tmp_path, f"env{i}", port, index=i, count=envoys,
                              policy=policy_file)
        envoy.env[DELAY_ENV] = str((delays or {}).get(i, 0.0))
        processes.append(envoy.start())
        started.append(envoy)
    client = DirectorClient(f"localhost:{port}", client_id="alice", timeout=10)

    def online() -> bool:
        try:
            return sum(e.online for e in client.envoys()) == envoys
        except grpc.RpcError:
            return False

    wait_for(online, timeout=60, message=f"{envoys} envoys online")
    return port, client, started


def envoys(port: int) -> dict[str, EnvoyView]:
    try:
        with DirectorClient(f"localhost:{port}", timeout=2) as client:
            return {e.name: e for e in client.envoys()}
    except Exception:  # director not up (yet): no envoys to show
        return {}


def submit(client: DirectorClient, name: str, collaborators: list[str], *, rounds: int = 3,
           files: dict[str, bytes] | None = None, task: str = "digits-logreg") -> None:
    plan = Plan(task=task, rounds=rounds, params={"learning_rate": 1.0}, round_timeout_s=60)
    archive, initial = experiment_archive(plan, files)
    client.submit(name, archive, collaborators=collaborators, initial_model=initial)


def submit_plan(client: DirectorClient, name: str, plan: Plan, collaborators: list[str],
                files: dict[str, bytes] | None = None) -> None:
    archive, initial = experiment_archive(plan, files)
    client.submit(name, archive, collaborators=collaborators, initial_model=initial)


def current_round(client: DirectorClient, name: str) -> int:
    try:
        return client.status(name).round
    except grpc.RpcError:
        return -1


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# -- the Kubernetes control plane ------------------------------------------------------

def restricted_namespace(cluster: ControlPlane, namespace: str) -> None:
    """Our CRDs, established, and a namespace enforcing Pod Security "restricted": every
    Pod the operator and envoys make (director, envoys, collaborators) must be admitted
    under it, or the tests find none."""
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl("label", "namespace", namespace,
                    "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/enforce-version=latest")
