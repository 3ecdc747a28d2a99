"""The role table under mTLS, RPC by RPC, and identity within a role, on a real server."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import message_factory

from fedkube.api.plan import Plan
from fedkube.client import experiment_archive
from fedkube.proto import aggregator_pb2, aggregator_pb2_grpc, director_pb2
from fedkube.transport.channel import open_channel
from fedkube.transport.limits import CHUNK_BYTES
from fedkube.transport.roles import ROLE_TABLE, Role
from fedkube.transport.tensors import chunk_message
from fedkube.transport.tls import TLSFiles
from tests.helpers import CertDir, RunningDirector, served_rpcs, shard_request, stub

# The test certificates (tests/conftest.py) and the role each carries.
CERTS: dict[str, Role | None] = {"root": Role.ADMIN, "alice": Role.OWNER, "env1": Role.ENVOY,
                                 "collab1": Role.COLLABORATOR, "director": Role.DIRECTOR,
                                 "norole": None}


async def _call(channel: grpc.aio.Channel, path: str, method: Any) -> grpc.StatusCode:
    """Calls an RPC with an empty request; returns how it ended."""
    request = message_factory.GetMessageClass(method.input_type)()
    response = message_factory.GetMessageClass(method.output_type)
    kind = (method.client_streaming, method.server_streaming)
    codec: dict[str, Any] = {"request_serializer": type(request).SerializeToString,
             "response_deserializer": response.FromString}
    try:
        if kind == (False, False):
            await channel.unary_unary(path, **codec)(request, timeout=5)
        elif kind == (True, False):
            await channel.stream_unary(path, **codec)(iter([request]), timeout=5)
        elif kind == (False, True):
            async for _ in channel.unary_stream(path, **codec)(request, timeout=5):
                pass
        else:
            async for _ in channel.stream_stream(path, **codec)(iter([request]), timeout=5):
                pass
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.PERMISSION_DENIED and (
                "may not call" in (exc.details() or "") or "no single fedkube role" in
                (exc.details() or "") or "not open to any caller" in (exc.details() or "")):
            return grpc.StatusCode.PERMISSION_DENIED
        return exc.code() if exc.code() != grpc.StatusCode.PERMISSION_DENIED else \
            grpc.StatusCode.OK  # refused later, by an identity check: the role passed
    return grpc.StatusCode.OK


@pytest.mark.parametrize("cert", list(CERTS))
async def test_role_table_enforced_on_every_rpc(mtls_director: RunningDirector,
                                                cert_dir: CertDir, cert: str) -> None:
    channel = open_channel(mtls_director.address, tls=TLSFiles.from_dir(cert_dir.path, cert),
                           client_id=cert)
    role = CERTS[cert]
    methods = served_rpcs()
    assert len(methods) == 24  # 14 director, 6 aggregator, 2 streaming, 2 review: all here
    refused: list[str] = []
    passed: list[str] = []
    for path, method in methods:
        code = await _call(channel, path, method)
        (refused if code == grpc.StatusCode.PERMISSION_DENIED else passed).append(path)
        allowed = role is not None and role in ROLE_TABLE.get(path, frozenset())
        assert (code != grpc.StatusCode.PERMISSION_DENIED) == allowed, (cert, path, code)
    await channel.close(None)
    # The table says what each role may do; this spells it out once, per role.
    short = sorted(p.rsplit("/", 1)[1] for p in passed)
    expected = {
        "root": ["GetDatasetInfo", "GetEnvoys", "GetExperimentDescription",
                 "GetExperimentStatus", "GetExperimentsList", "GetMetricStream",
                 "GetTrainedModel", "RemoveExperimentData", "SetNewExperiment"],
        "env1": ["BulkEndpoint", "Decide", "Describe", "GetAggregatedTensor", "GetDatasetInfo",
                 "GetExperimentData", "GetTasks", "SendLocalTaskResults",
                 "SetExperimentFailed", "StreamAggregatedTensor", "UpdateEnvoyStatus",
                 "UpdateShardInfo", "WaitExperiment"],
        "collab1": ["BulkEndpoint", "GetAggregatedTensor", "GetExperimentData", "GetTasks",
                    "SendLocalTaskResults", "StreamAggregatedTensor"],
        "director": [], "norole": []}
    expected["alice"] = expected["root"]
    assert short == expected[cert]


async def _experiment(owner: Any, name: str, collaborators: list[str]) -> None:
    archive, initial = experiment_archive(Plan(task="digits-logreg", rounds=2))

    async def messages() -> Any:
        yield director_pb2.ExperimentInfo(
            name=name, collaborator_names=collaborators,
            experiment_data=director_pb2.ExperimentData(size=len(archive), npbytes=archive),
            model_proto=initial)

    assert (await owner.SetNewExperiment(messages())).accepted


async def _denied(call: Any, text: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED, error.value
    assert text in (error.value.details() or ""), error.value.details()


async def test_identities_within_roles(mtls_director: RunningDirector,
                                       cert_dir: CertDir) -> None:
    def client(name: str) -> Any:
        return stub(mtls_director.address, tls=TLSFiles.from_dir(cert_dir.path, name))

    env1, env2, alice, bob, root = (client(n) for n in ("env1", "env2", "alice", "bob", "root"))
    await env1.UpdateShardInfo(shard_request("env1"))
    await env2.UpdateShardInfo(shard_request("env2"))
    await _experiment(alice, "only-env2", ["env2"])

    # An envoy cannot report for another shard, read another experiment's data, or fail it.
    await _denied(env1.UpdateEnvoyStatus(director_pb2.UpdateEnvoyStatusRequest(name="env2")),
                  "may not act for 'env2'")
    stream = env1.GetExperimentData(director_pb2.GetExperimentDataRequest(
        experiment_name="only-env2", collaborator_name="env1"))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in stream:
            pass
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await _denied(env1.SetExperimentFailed(director_pb2.SetExperimentFailedRequest(
        experiment_name="only-env2", collaborator_name="env1")), "not a collaborator")
    await _denied(env1.SetExperimentFailed(director_pb2.SetExperimentFailedRequest(
        experiment_name="only-env2", collaborator_name="env2")), "may not act for 'env2'")

    # A collaborator (certificate for shard env1) cannot work for an experiment without
    # env1, nor pose as env2 in the header.
    channel = open_channel(mtls_director.address, client_id="env1",
                           tls=TLSFiles.from_dir(cert_dir.path, "collab1"))
    aggregator = aggregator_pb2_grpc.AggregatorStub(channel)
    for sender in ("env1", "env2"):
        header = aggregator_pb2.MessageHeader(sender=sender, federation_uuid="only-env2")
        await _denied(aggregator.GetTasks(aggregator_pb2.GetTasksRequest(header=header)),
                      "may not act for" if sender == "env2" else "not a collaborator")
        results = aggregator_pb2.TaskResults(header=header, round_number=0,
                                             task_name="train", data_size=1)
        await _denied(aggregator.SendLocalTaskResults(
            chunk_message(results.SerializeToString(), CHUNK_BYTES)),
            "may not act for" if sender == "env2" else "not a collaborator")
    # ...and a collaborator certificate cannot act as an envoy at all.
    collab = client("collab1")
    await _denied(collab.UpdateEnvoyStatus(director_pb2.UpdateEnvoyStatusRequest(name="env1")),
                  "role 'collaborator' may not call UpdateEnvoyStatus")

    # Owners see only their own experiments; an admin sees every one.
    listed = await bob.GetExperimentsList(director_pb2.GetExperimentsListRequest())
    assert [e.name for e in listed.experiments] == []
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await bob.GetExperimentStatus(director_pb2.GetExperimentStatusRequest(
            experiment_name="only-env2"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await root.GetExperimentsList(director_pb2.GetExperimentsListRequest())
    assert [e.name for e in listed.experiments] == ["only-env2"]

    # Under mTLS the right envoy's SetExperimentFailed is honoured (OpenFL 1.6 ignores it).
    await env2.SetExperimentFailed(director_pb2.SetExperimentFailedRequest(
        experiment_name="only-env2", collaborator_name="env2", error_code=3,
        error_description="disk full"))
    status = await alice.GetExperimentStatus(director_pb2.GetExperimentStatusRequest(
        experiment_name="only-env2"))
    assert status.experiment_status == "failed"
    record = mtls_director.server.director.experiment("only-env2")
    assert "env2 failed (code 3): disk full" in record.error
    for c in (env1, env2, alice, bob, root, collab):
        await c.channel.close()
    await channel.close(None)


def _certificate(*units: str, rdn_per_unit: bool = True) -> bytes:
    """A certificate whose subject names these OUs (one RDN each, or all in one)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    ous = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, u) for u in units]
    rdns = ([x509.RelativeDistinguishedName([ou]) for ou in ous] if rdn_per_unit
            else [x509.RelativeDistinguishedName(ous)])
    name = x509.Name([*rdns, x509.RelativeDistinguishedName(
        [x509.NameAttribute(NameOID.COMMON_NAME, "alice")])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("one_rdn", [False, True], ids=["two-rdns", "one-rdn"])
def test_a_certificate_with_two_roles_has_none(one_rdn: bool) -> None:
    """The first OU won: with both in one RDN they sort, and `admin` came first."""
    from fedkube.transport.roles import refusal, role_of_certificate

    assert role_of_certificate(_certificate("owner")) is Role.OWNER
    assert role_of_certificate(_certificate("owner", "owner")) is Role.OWNER
    both = role_of_certificate(_certificate("owner", "admin", rdn_per_unit=not one_rdn))
    assert both is None
    reason = refusal("/openfl.director.Director/GetExperimentsList", both)
    assert reason is not None and "exactly one" in reason


async def test_owners_see_only_their_own_experiments_names_on_envoys(
        mtls_director: RunningDirector, cert_dir: CertDir) -> None:
    """GetEnvoys told every owner what each shard runs: another owner's experiment names."""
    clients = {who: stub(mtls_director.address, tls=TLSFiles.from_dir(cert_dir.path, who))
               for who in ("env1", "alice", "bob", "root")}
    assert (await clients["env1"].UpdateShardInfo(shard_request("env1"))).accepted
    await _experiment(clients["alice"], "alices-secret-project", ["env1"])

    async def shown(who: str) -> str:
        reply = await clients[who].GetEnvoys(director_pb2.GetEnvoysRequest())
        (envoy,) = [e for e in reply.envoy_infos if e.shard_info.node_info.name == "env1"]
        return envoy.experiment_name

    assert await shown("alice") == "alices-secret-project"
    assert await shown("root") == "alices-secret-project"
    assert await shown("bob") == ""
    for client in clients.values():
        await client.channel.close()  # type: ignore[attr-defined]


async def test_names_are_per_owner_and_an_admin_named_alice_is_not_the_owner_alice(
        mtls_director: RunningDirector, cert_dir: CertDir) -> None:
    """SetNewExperiment answered ALREADY_EXISTS for a name another owner held, and the
    admin alice and the owner alice were one owner (identity was the CN alone)."""
    clients = {who: stub(mtls_director.address, tls=TLSFiles.from_dir(cert_dir.path, who))
               for who in ("env1", "alice", "bob", "alice-admin")}
    assert (await clients["env1"].UpdateShardInfo(shard_request("env1"))).accepted
    for who in ("alice", "bob", "alice-admin"):
        await _experiment(clients[who], "mnist", ["env1"])  # each its own `mnist`

    async def listed(who: str) -> list[str]:
        reply = await clients[who].GetExperimentsList(director_pb2.GetExperimentsListRequest())
        return sorted(e.name for e in reply.experiments)

    assert await listed("alice") == ["mnist"] and await listed("bob") == ["mnist"]
    keys = await listed("alice-admin")  # an admin sees all three, by the director's keys
    assert len(keys) == 3 and "mnist" in keys
    director = mtls_director.server.director
    owners = {director.experiment(k).owner for k in keys}
    assert owners == {"owner:alice", "owner:bob", "admin:alice"}

    # Each owner's `mnist` is its own: status, removal, and a second one refused.
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _experiment(clients["bob"], "mnist", ["env1"])
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "you already have" in (error.value.details() or "")
    await clients["bob"].RemoveExperimentData(director_pb2.RemoveExperimentRequest(
        experiment_name="mnist"))
    assert await listed("bob") == []
    assert await listed("alice") == ["mnist"] and len(await listed("alice-admin")) == 2
    status = await clients["alice"].GetExperimentStatus(director_pb2.GetExperimentStatusRequest(
        experiment_name="mnist"))
    assert status.experiment_status == "in_progress"  # alice's, the first on env1
    for client in clients.values():
        await client.channel.close()  # type: ignore[attr-defined]
