"""The data owner's review as real processes: a director, envoys with shard policies, the
owner's `fedkube experiment status` and the data owner's `fedkube shard approve|refuse`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc

from fedkube.api.plan import Plan
from fedkube.client.director_client import DirectorClient
from fedkube.dev.processes import Process, director_process, envoy_process, free_port, wait_for
from tests.helpers import submit_plan, write_policy


def federation(tmp_path: Path, processes: list[Process],
               policies: list[dict[str, Any]]) -> tuple[int, DirectorClient]:
    """A director and one envoy per policy (env0..), all online; a client as alice."""
    port = free_port()
    processes.append(director_process(tmp_path, port, period=1.0).start())
    for i, policy in enumerate(policies):
        processes.append(envoy_process(
            tmp_path, f"env{i}", port, index=i, count=len(policies),
            policy=write_policy(tmp_path, policy, name=f"env{i}-policy")).start())
    client = DirectorClient(f"localhost:{port}", client_id="alice", timeout=10)

    def online() -> bool:
        try:
            return sum(e.online for e in client.envoys()) == len(policies)
        except grpc.RpcError:
            return False

    wait_for(online, timeout=60, message="the envoys online")
    return port, client


def fedkube(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedkube.cli", *args], capture_output=True,
                          text=True, timeout=60)


def awaiting(client: DirectorClient, name: str) -> list[str]:
    return client.status(name).awaiting_approval


def test_one_shard_approves_one_refuses_and_it_runs_on_the_approver(
        tmp_path: Path, processes: list[Process]) -> None:
    port, client = federation(tmp_path, processes, [{"approval": "manual"}] * 2)
    plan = Plan(task="digits-logreg", rounds=2, params={"learning_rate": 1.0},
                round_timeout_s=60, min_collaborators=1)
    submit_plan(client, "consent", plan, ["env0", "env1"])
    wait_for(lambda: awaiting(client, "consent") == ["env0", "env1"], timeout=60,
             message="both shards awaiting their data owners")
    # The owner sees it waiting, and who it waits for; nothing has run.
    shown = fedkube("experiment", "status", "consent", "--director", f"localhost:{port}",
                    "--insecure", "--client-id", "alice")
    assert shown.returncode == 0, shown.stderr
    assert "awaiting approval from env0, env1" in shown.stdout
    assert client.status("consent").round == 0
    # Each data owner sees what asks to run on its data, and answers.
    pending = fedkube("shard", "pending", "--work-dir", str(tmp_path / "env0"))
    assert "consent" in pending.stdout and "alice" in pending.stdout
    assert "digits-logreg" in pending.stdout
    assert fedkube("shard", "approve", "consent", "--work-dir",
                   str(tmp_path / "env0")).returncode == 0
    refused = fedkube("shard", "refuse", "consent", "--work-dir", str(tmp_path / "env1"),
                      "--reason", "our ethics board has not approved this study")
    assert refused.returncode == 0, refused.stderr
    final = client.wait("consent", timeout=120)
    assert final.status == "finished", final.error
    assert final.review["env0"].decision == "accepted"
    assert final.review["env1"] == type(final.review["env1"])(
        "refused", "our ethics board has not approved this study")
    # It ran on the approver alone: every collaborator metric is env0's.
    origins = {m.origin for m in client.metrics("consent") if m.origin != "aggregator"}
    assert origins == {"env0"}
    shown = fedkube("experiment", "status", "consent", "--director", f"localhost:{port}",
                    "--insecure", "--client-id", "alice")
    assert "refused by env1: our ethics board has not approved this study" in shown.stdout
    # An unknown experiment is one line and an exit code for the data owner.
    wrong = fedkube("shard", "approve", "nope", "--work-dir", str(tmp_path / "env0"))
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1
    assert "no experiment 'nope' is waiting" in wrong.stderr


def test_without_quorum_it_fails_with_each_shards_reason(
        tmp_path: Path, processes: list[Process]) -> None:
    """env0's policy refuses alice by itself; env1's data owner refuses by hand."""
    _, client = federation(tmp_path, processes,
                              [{"owners": ["bob"]}, {"approval": "manual"}])
    plan = Plan(task="digits-logreg", rounds=2, params={"learning_rate": 1.0},
                round_timeout_s=60, min_collaborators=1)
    submit_plan(client, "unwelcome", plan, ["env0", "env1"])
    def decided() -> dict[str, str]:
        return {s: r.decision for s, r in client.status("unwelcome").review.items()}

    wait_for(lambda: decided() == {"env0": "refused", "env1": "awaiting"}, timeout=60,
             message="env0 refused by its policy, env1 awaiting its data owner")
    fedkube("shard", "refuse", "unwelcome", "--work-dir", str(tmp_path / "env1"),
            "--reason", "not during the audit")
    final = client.wait("unwelcome", timeout=60)
    assert final.status == "failed"
    assert "owner 'alice' may not use this shard" in final.error
    assert "env1: not during the audit" in final.error
    assert "0 collaborators left, quorum 1" in final.error


def test_the_default_policy_refuses_user_code_and_the_owner_sees_why(
        tmp_path: Path, processes: list[Process]) -> None:
    """Before, every envoy ran whatever it was sent."""
    from tests.helpers import SLOW_TASK

    _, client = federation(tmp_path, processes, [{}])
    plan = Plan(task="archive:slow", rounds=2, params={"learning_rate": 1.0},
                round_timeout_s=60)
    submit_plan(client, "own-code", plan, ["env0"], files={"slow.py": SLOW_TASK})
    final = client.wait("own-code", timeout=60)
    assert final.status == "failed"
    assert "user code is not allowed" in final.review["env0"].reason
    assert "user code is not allowed" in final.error


async def test_the_federations_policy_refuses_at_submission_with_its_reason(
        tmp_path: Path) -> None:
    """The federation admin's review (`director start --policy`): the same rules as a
    shard's, applied when an experiment is submitted."""
    from fedkube.api.config import DirectorConfig, TLSSettings
    from fedkube.client.director_client import experiment_archive
    from fedkube.director.server import DirectorServer
    from fedkube.proto import director_pb2
    from tests.helpers import RunningDirector, shard_request, stub

    policy = write_policy(tmp_path, {"owners": ["alice"], "maxRounds": 5})
    server = DirectorServer(DirectorConfig(host="127.0.0.1", port=0, data_dir=tmp_path / "d",
                                           tls=TLSSettings(insecure=True), policy=policy))
    await server.start()
    try:
        address = RunningDirector(server).address
        envoy = stub(address, client_id="env1")
        assert (await envoy.UpdateShardInfo(shard_request("env1"))).accepted

        async def submit(owner: str, name: str, rounds: int) -> grpc.aio.AioRpcError | None:
            archive, initial = experiment_archive(Plan(task="digits-logreg", rounds=rounds))

            async def messages() -> Any:
                yield director_pb2.ExperimentInfo(
                    name=name, collaborator_names=["env1"], model_proto=initial,
                    experiment_data=director_pb2.ExperimentData(size=len(archive),
                                                                npbytes=archive))
            client = stub(address, client_id=owner)
            try:
                await client.SetNewExperiment(messages())
                return None
            except grpc.aio.AioRpcError as exc:
                return exc
            finally:
                await client.channel.close()  # type: ignore[attr-defined]

        too_long = await submit("alice", "long", 10)
        assert too_long is not None and too_long.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "federation policy: 10 rounds, more than the 5 allowed" in (
            too_long.details() or "")
        stranger = await submit("bob", "mine", 2)
        assert stranger is not None and "owner 'bob' may not use this federation" in (
            stranger.details() or "")
        assert await submit("alice", "short", 2) is None
        assert [r.name for r in server.director.experiment_records()] == ["short"]
        assert not (tmp_path / "d" / "experiments" / "long").exists()  # nothing kept
        await envoy.channel.close()  # type: ignore[attr-defined]
    finally:
        await server.stop(None)


def test_shard_annotations_answer_only_the_experiment_they_name() -> None:
    from fedkube.kube.shard_answers import answer_in

    assert answer_in({}, "ns.e") is None
    assert answer_in({"fedkube.io/approve": "ns.other"}, "ns.e") is None
    assert answer_in({"fedkube.io/approve": "ns.e"}, "ns.e") == (
        "accepted", "approved by the data owner")
    assert answer_in({"fedkube.io/approve": "ns.e", "fedkube.io/refuse": "ns.e",
                      "fedkube.io/reason": "audit"}, "ns.e") == ("refused", "audit")


def test_a_collaborator_past_the_policys_wall_time_is_stopped_and_the_owner_told(
        tmp_path: Path, processes: list[Process]) -> None:
    from tests.helpers import SLOW_TASK, start_federation

    _, client, _ = start_federation(
        tmp_path, processes, 1, delays={0: 1.0},
        policy={"userCode": True, "maxWallTimeSeconds": 3,
                "passEnv": ["FEDKUBE_TEST_TRAIN_DELAY_S"]})
    plan = Plan(task="archive:slow", rounds=100, params={"learning_rate": 1.0},
                round_timeout_s=60)
    submit_plan(client, "too-long", plan, ["env0"], files={"slow.py": SLOW_TASK})
    final = client.wait("too-long", timeout=90)
    assert final.status == "failed"
    assert "ran past the 3 s its data owner allows (maxWallTimeSeconds)" in final.error
    assert final.round < 100  # stopped long before its 100 rounds of a second each
