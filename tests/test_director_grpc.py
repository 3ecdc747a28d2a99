"""The director's gRPC service on loopback: real servers, real channels, real TLS."""

from __future__ import annotations

import asyncio
import io
import os
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from fedkube.api.experiment import ExperimentState
from fedkube.api.plan import Plan
from fedkube.client.director_client import DirectorClient
from fedkube.proto import director_pb2, director_pb2_grpc
from fedkube.tasks.archive import build_archive
from fedkube.transport.tls import TLSFiles
from tests.helpers import (
    CertDir,
    RunningDirector,
    running_experiment,
    shard_request,
    start_director,
    stub,
)


def zip_with(member: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("plan.yaml", "task: digits-logreg\n")
        z.writestr(member, "x")
    return buffer.getvalue()


async def test_register_health_and_envoy_list(director: RunningDirector) -> None:
    client = stub(director.address)
    assert (await client.UpdateShardInfo(shard_request("env1"))).accepted
    response = await client.UpdateEnvoyStatus(director_pb2.UpdateEnvoyStatusRequest(
        name="env1", cuda_devices=[director_pb2.CudaDeviceInfo(index=0, name="H100")]))
    assert response.health_check_period.ToTimedelta().total_seconds() == 2.0
    envoys = (await client.GetEnvoys(director_pb2.GetEnvoysRequest())).envoy_infos
    assert [e.shard_info.node_info.name for e in envoys] == ["env1"]
    assert envoys[0].is_online
    assert envoys[0].shard_info.node_info.cuda_devices[0].name == "H100"
    assert envoys[0].valid_duration.ToTimedelta().total_seconds() == 4.0
    info = await client.GetDatasetInfo(director_pb2.GetDatasetInfoRequest())
    assert list(info.shard_info.sample_shape) == ["8", "8"]


async def test_shape_mismatch_not_accepted_with_reason(director: RunningDirector) -> None:
    client = stub(director.address)
    call = client.UpdateShardInfo(shard_request("env1", ("28", "28")))
    assert not (await call).accepted
    reason = dict(await call.trailing_metadata())["fedkube-reason"]
    assert "sample shape ['28', '28']" in reason


async def test_unknown_envoy_health_check_is_not_found(director: RunningDirector) -> None:
    client = stub(director.address)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.UpdateEnvoyStatus(director_pb2.UpdateEnvoyStatusRequest(name="ghost"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "ghost" in (error.value.details() or "")


async def _submit(client: director_pb2_grpc.DirectorAsyncStub, name: str, collaborators: list[str],
                  payload: bytes) -> director_pb2.SetNewExperimentResponse:
    async def messages() -> AsyncIterator[director_pb2.ExperimentInfo]:
        for offset in range(0, len(payload), 1 << 20):
            chunk = payload[offset:offset + (1 << 20)]
            yield director_pb2.ExperimentInfo(
                name=name, collaborator_names=collaborators,
                experiment_data=director_pb2.ExperimentData(size=len(chunk), npbytes=chunk))

    return await client.SetNewExperiment(messages())


async def test_submit_dispatch_and_stream_experiment_data(director: RunningDirector) -> None:
    owner, envoy = stub(director.address, client_id="alice"), stub(director.address,
                                                                   client_id="env1")
    await envoy.UpdateShardInfo(shard_request("env1"))
    waiting = asyncio.ensure_future(envoy.WaitExperiment(
        director_pb2.WaitExperimentRequest(collaborator_name="env1")))
    # 5 MB of incompressible data: several chunks each way
    payload = build_archive(Plan(task="digits-logreg"), {"data.bin": os.urandom(5 << 20)})
    assert (await _submit(owner, "exp-1", ["env1"], payload)).accepted
    assert (await asyncio.wait_for(waiting, 10)).experiment_name == "exp-1"
    received = b"".join([chunk.npbytes async for chunk in envoy.GetExperimentData(
        director_pb2.GetExperimentDataRequest(experiment_name="exp-1",
                                              collaborator_name="env1"))])
    assert received == payload
    listing = await owner.GetExperimentsList(director_pb2.GetExperimentsListRequest())
    assert [(e.name, e.status) for e in listing.experiments] == [("exp-1", "in_progress")]
    bob = stub(director.address, client_id="bob")
    other = await bob.GetExperimentsList(
        director_pb2.GetExperimentsListRequest())
    assert list(other.experiments) == []
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await owner.GetTrainedModel(director_pb2.GetTrainedModelRequest(experiment_name="exp-1"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_bad_submissions_get_clear_statuses(director: RunningDirector) -> None:
    owner = stub(director.address)
    await owner.UpdateShardInfo(shard_request("env1"))
    archive = build_archive(Plan(task="digits-logreg"))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _submit(owner, "exp", ["nobody"], archive)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown collaborators" in (error.value.details() or "")
    for bad, reason in ((b"not a zip", "not a zip"),
                        (build_archive(Plan(task="no-such-task")), "unknown task"),
                        (zip_with("../escape.txt"), "parent-directory")):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _submit(owner, "exp", ["env1"], bad)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason in (error.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await owner.GetExperimentStatus(
            director_pb2.GetExperimentStatusRequest(experiment_name="nope"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert await _submit(owner, "exp", ["env1"], archive)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _submit(owner, "exp", ["env1"], archive)
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_mtls_identity_mismatch_is_permission_denied(
        mtls_director: RunningDirector, cert_dir: CertDir) -> None:
    env1 = stub(mtls_director.address, tls=TLSFiles.from_dir(cert_dir.path, "env1"))
    assert (await env1.UpdateShardInfo(shard_request("env1"))).accepted
    await env1.UpdateEnvoyStatus(director_pb2.UpdateEnvoyStatusRequest(name="env1"))
    env2 = stub(mtls_director.address, tls=TLSFiles.from_dir(cert_dir.path, "env2"))
    for call in (
        env2.UpdateEnvoyStatus(director_pb2.UpdateEnvoyStatusRequest(name="env1")),
        env2.UpdateShardInfo(shard_request("env1")),
        env2.WaitExperiment(director_pb2.WaitExperimentRequest(collaborator_name="env1")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'env2' may not act for 'env1'" in (error.value.details() or "")


async def test_wrong_ca_is_refused_at_handshake(
        mtls_director: RunningDirector, cert_dir: CertDir, rogue_cert_dir: CertDir) -> None:
    rogue = TLSFiles(ca=(cert_dir.path / "ca.crt").read_bytes(),
                     cert=(rogue_cert_dir.path / "env1.crt").read_bytes(),
                     key=(rogue_cert_dir.path / "env1.key").read_bytes())
    client = stub(mtls_director.address, tls=rogue)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.UpdateShardInfo(shard_request("env1"), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    # and a client that does not trust the director's CA refuses the director
    distrust = TLSFiles(ca=(rogue_cert_dir.path / "ca.crt").read_bytes(),
                        cert=(cert_dir.path / "env1.crt").read_bytes(),
                        key=(cert_dir.path / "env1.key").read_bytes())
    client = stub(mtls_director.address, tls=distrust)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.UpdateShardInfo(shard_request("env1"), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mtls_director.server.director.get_envoys() == []


async def test_plaintext_client_cannot_reach_mtls_director(
        mtls_director: RunningDirector) -> None:
    client = stub(mtls_director.address)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.GetEnvoys(director_pb2.GetEnvoysRequest(), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_collaborators_of_an_experiment_that_ended_before_a_restart_are_told_to_quit(
        tmp_path: Path) -> None:
    from fedkube.api.config import TLSSettings
    from fedkube.api.experiment import ExperimentState
    from fedkube.director.store import ExperimentRecord, open_store
    from fedkube.proto import aggregator_pb2, aggregator_pb2_grpc

    # What the director's SQLite store holds after "done" ended and "broken" failed.
    store = open_store(tmp_path / "director")
    for name, status in (("done", ExperimentState.FINISHED),
                         ("broken", ExperimentState.FAILED)):
        store.put_experiment(ExperimentRecord(
            name=name, owner="alice", collaborators=("env1", "env2"),
            archive_path=str(tmp_path / name / "experiment.zip"), status=status,
            created_at=1.0, updated_at=2.0, total_rounds=3, current_round=3))
    store.close()
    running = await start_director(tmp_path, tls=TLSSettings(insecure=True))
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            aggregator = aggregator_pb2_grpc.AggregatorStub(channel)

            def tasks(sender: str, experiment: str) -> aggregator_pb2.GetTasksRequest:
                return aggregator_pb2.GetTasksRequest(header=aggregator_pb2.MessageHeader(
                    sender=sender, receiver="aggregator", federation_uuid=experiment))

            for experiment in ("done", "broken"):
                reply = await aggregator.GetTasks(tasks("env2", experiment))
                assert reply.quit and not reply.tasks
            # Only its collaborators are told; anyone else learns it is over.
            with pytest.raises(grpc.aio.AioRpcError) as outsider:
                await aggregator.GetTasks(tasks("env3", "done"))
            assert outsider.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is over" in (outsider.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await aggregator.GetTasks(tasks("env1", "never-submitted"))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await running.server.stop(None)


async def test_an_error_with_newlines_and_non_ascii_text_reaches_the_owner(
        director: RunningDirector) -> None:
    """An envoy's error is often a traceback: many lines, and whatever characters the
    failure printed. Trailing metadata takes printable ASCII only, so it travels escaped
    (an unescaped newline made GetExperimentDescription fail: INTERNAL, Invalid metadata)."""
    await running_experiment(director)
    error = "Traceback (most recent call last):\n  File \"x.py\"\nValueError: naïve 100% → ✗"
    director.server.director.finish_experiment("exp", ExperimentState.FAILED, error)

    def status() -> tuple[str, str]:
        with DirectorClient(director.address, client_id="alice", timeout=10) as client:
            view = client.status("exp")
            return view.status, view.error

    assert await asyncio.to_thread(status) == ("failed", error)



async def test_an_openfl_collaborator_of_no_running_experiment_is_told_to_stop(
        director: RunningDirector) -> None:
    """OpenFL's collaborator retries every error but UNAUTHENTICATED at once, forever: one
    whose experiment this director does not run is told to quit, or refused with it."""
    from fedkube.proto import aggregator_pb2, aggregator_pb2_grpc

    header = aggregator_pb2.MessageHeader(sender="env1", receiver="aggregator_plan.yaml_0bad",
                                          federation_uuid="plan.yaml_0bad")
    async with grpc.aio.insecure_channel(director.address) as channel:
        aggregator = aggregator_pb2_grpc.AggregatorStub(channel)
        tasks = await aggregator.GetTasks(aggregator_pb2.GetTasksRequest(header=header))
        assert tasks.quit
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await aggregator.GetAggregatedTensor(aggregator_pb2.GetAggregatedTensorRequest(
                header=header, tensor_name="w", round_number=0, tags=["model"]))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "plan.yaml_0bad" in (error.value.details() or "")


async def test_names_are_matched_whole_a_trailing_newline_is_no_name(
        director: RunningDirector) -> None:
    """Experiment and shard names are full matches: `re.match` with `$` let `exp\\n` in."""
    envoy = stub(director.address, client_id="env1")
    for bad in ("env1\n", "a/b", "../x", "x" * 254, " env1", "env 1"):
        reply = await envoy.UpdateShardInfo(shard_request(bad))
        assert not reply.accepted, bad
    assert (await envoy.UpdateShardInfo(shard_request("env1"))).accepted
    owner = stub(director.address, client_id="alice")
    archive = build_archive(Plan(task="digits-logreg", rounds=1))

    async def messages(name: str) -> AsyncIterator[director_pb2.ExperimentInfo]:
        yield director_pb2.ExperimentInfo(
            name=name, collaborator_names=["env1"],
            experiment_data=director_pb2.ExperimentData(size=len(archive), npbytes=archive))

    for bad in ("exp\n", "exp\n\n", "Exp", "-exp"):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await owner.SetNewExperiment(messages(bad))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "experiment name" in (error.value.details() or "")
    await envoy.channel.close()  # type: ignore[attr-defined]
    await owner.channel.close()  # type: ignore[attr-defined]


async def test_a_new_experiment_never_inherits_a_removed_ones_files(
        director: RunningDirector) -> None:
    """A removal that crashed after forgetting the name but before deleting the files left
    `best.pb` behind; another owner's new experiment of that name served it."""
    leftover = director.server.director.experiment_dir("exp")
    leftover.mkdir(parents=True)
    (leftover / "best.pb").write_bytes(b"the previous owner's model")
    await running_experiment(director)  # a new experiment "exp", by alice
    owner = stub(director.address, client_id="alice")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await owner.GetTrainedModel(director_pb2.GetTrainedModelRequest(
            experiment_name="exp", model_type=director_pb2.GetTrainedModelRequest.BEST_MODEL))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not (leftover / "best.pb").exists()
    await owner.channel.close()  # type: ignore[attr-defined]


async def test_a_training_weight_past_the_shards_registered_samples_is_refused(
        director: RunningDirector) -> None:
    """FedAvg weighs by the self-reported data_size: unbounded, one collaborator could
    control the average. It may not exceed the samples its shard registered."""
    from fedkube.proto import aggregator_pb2_grpc
    from fedkube.transport.tensors import chunk_message
    from tests.helpers import task_results

    aggregator = await running_experiment(director)
    async with grpc.aio.insecure_channel(director.address) as channel:
        stub_ = aggregator_pb2_grpc.AggregatorStub(channel)

        async def send(data_size: int) -> None:
            results = task_results("env1")
            results.data_size = data_size
            await stub_.SendLocalTaskResults(iter(list(chunk_message(
                results.SerializeToString(), 1 << 20))))

        with pytest.raises(grpc.aio.AioRpcError) as error:
            await send(10**9)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exceeds the 100000 samples shard env1 registered" in (error.value.details() or "")
        await send(100_000)  # at the cap: taken
    assert "train" not in aggregator.tasks_for("env1")  # its training is in
