"""The director's bulk port (fedkube.transport.bulk): collaborators move models over it,
the aggregator checks what comes in as on gRPC, bad peers get a status and break nothing,
and collaborators fall back to the gRPC streams when they cannot reach it."""

from __future__ import annotations

import asyncio
import datetime as dt
import select
import socket
import ssl
import struct
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedkube.aggregator import metrics
from fedkube.api.config import TLSSettings
from fedkube.api.plan import Plan
from fedkube.client import DirectorClient, experiment_archive
from fedkube.collaborator.run import Collaborator
from fedkube.dev.processes import Process, envoy_process, wait_for
from fedkube.proto import aggregator_pb2
from fedkube.tasks.digits import DigitsShard
from fedkube.tasks.models import BUILTIN_TASKS
from fedkube.transport import certs
from fedkube.transport import metrics as transfer_metrics
from fedkube.transport.bulk import (
    HEADER_TIMEOUT_S,
    BulkClient,
    BulkError,
    PeerContext,
    Segments,
)
from fedkube.transport.bulk import WORKERS as BULK_WORKERS
from fedkube.transport.tensors import encode_task_results, parse_tensor_response
from fedkube.transport.tls import TLSFiles
from tests.helpers import (
    CertDir,
    RunningDirector,
    bad_results,
    running_director,
    running_experiment,
    task_results,
)


def sent(rpc: str) -> float:
    return float(transfer_metrics.BYTES_SENT.labels(rpc)._value.get())


def received(rpc: str) -> float:
    return float(transfer_metrics.BYTES_RECEIVED.labels(rpc)._value.get())


def bulk_client(director: RunningDirector, tls: TLSFiles | None = None) -> BulkClient:
    assert director.server.bulk is not None
    return BulkClient("localhost", director.server.bulk.port, tls=tls)


def header(sender: str, experiment: str = "exp") -> aggregator_pb2.MessageHeader:
    return aggregator_pb2.MessageHeader(sender=sender, federation_uuid=experiment)


async def upload(client: BulkClient, results: aggregator_pb2.TaskResults,
                 claimed: aggregator_pb2.MessageHeader | None = None) -> bytes:
    """As a collaborator uploads, on a thread: the director's loop serves the port."""
    return await asyncio.to_thread(
        client.upload, (claimed or results.header).SerializeToString(),
        [results.SerializeToString()])


async def test_bad_results_over_the_bulk_port_are_refused_without_touching_the_model(
        director: RunningDirector) -> None:
    aggregator = await running_experiment(director)
    before = {k: v.copy() for k, v in aggregator.model.items()}
    client = bulk_client(director)
    for message, code, text in bad_results():
        with pytest.raises(BulkError) as error:
            await upload(client, message)
        assert error.value.code() == code, (text, error.value.details())
        assert text in error.value.details()
    # The body names another sender than the header the upload was admitted on.
    with pytest.raises(BulkError) as error:
        await upload(client, task_results("env2"), claimed=header("env1"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "another sender" in error.value.details()
    # More than any result of this model could be: refused before a byte is read.
    assert director.server.bulk is not None
    with socket.create_connection(("127.0.0.1", director.server.bulk.port)) as raw:
        head = header("env1").SerializeToString()
        raw.sendall(b"FKB1U" + struct.pack(">I", len(head)) + head + struct.pack(">Q", 1 << 40))
        reply = await asyncio.to_thread(raw.recv, 4096)
    assert reply[0] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert b"exceed" in reply
    # Not the protocol at all.
    with socket.create_connection(("127.0.0.1", director.server.bulk.port)) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
        reply = await asyncio.to_thread(raw.recv, 4096)
    assert reply[0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert b"not a fedkube bulk request" in reply
    # A peer that stops half-way through its body.
    good = task_results("env1").SerializeToString()
    with socket.create_connection(("127.0.0.1", director.server.bulk.port)) as raw:
        raw.sendall(b"FKB1U" + struct.pack(">I", len(head)) + head
                    + struct.pack(">Q", len(good)))
        assert await asyncio.to_thread(raw.recv, 1) == b"\x00"  # go ahead
        raw.sendall(good[:len(good) // 2])
    assert aggregator._fedavg.count == 0
    for name, value in before.items():
        np.testing.assert_array_equal(aggregator.model[name], value)
    # The port still serves: a good result is taken once, and acknowledged, not added,
    # when sent again.
    for _ in range(2):
        answer = aggregator_pb2.SendLocalTaskResultsResponse.FromString(
            await upload(client, task_results("env1")))
        assert answer.header.receiver == "env1"
    assert aggregator._fedavg.count == 1


async def test_bulk_transfers_check_certificates_as_grpc_does(
        mtls_director: RunningDirector, cert_dir: CertDir, rogue_cert_dir: CertDir) -> None:
    aggregator = await running_experiment(mtls_director, cert_dir)
    request = aggregator_pb2.GetAggregatedTensorRequest(
        header=header("env1"), tensor_name="weights", round_number=0).SerializeToString()
    env1 = bulk_client(mtls_director, TLSFiles.from_dir(cert_dir.path, "env1"))
    for _ in range(2):  # the second resumes the first's TLS session
        values = parse_tensor_response(await asyncio.to_thread(env1.download, "w",
                                                               request))[1]
        np.testing.assert_array_equal(values, aggregator.model["weights"])
    assert env1.resumed == 1
    refusals = [
        ("env2", "'env2' may not act for 'env1'"),  # another shard's envoy
        ("alice", "role 'owner' may not call StreamAggregatedTensor"),  # a model owner
    ]
    for cert, text in refusals:
        client = bulk_client(mtls_director, TLSFiles.from_dir(cert_dir.path, cert))
        for _ in range(2):  # a resumed session keeps its certificate's identity
            with pytest.raises(BulkError) as error:
                await asyncio.to_thread(client.download, "w", request)
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert text in error.value.details()
        assert client.resumed == 1
    env2 = bulk_client(mtls_director, TLSFiles.from_dir(cert_dir.path, "env2"))
    with pytest.raises(BulkError) as error:
        await asyncio.to_thread(env2.upload, header("env1").SerializeToString(),
                                encode_task_results(task_results("env1"), []))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A certificate of another CA does not get through the handshake.
    rogue = TLSFiles(ca=(cert_dir.path / "ca.crt").read_bytes(),
                     cert=(rogue_cert_dir.path / "env1.crt").read_bytes(),
                     key=(rogue_cert_dir.path / "env1.key").read_bytes())
    with pytest.raises(OSError):
        await asyncio.to_thread(bulk_client(mtls_director, rogue).download, "w", request)
    assert aggregator._fedavg.count == 0


@pytest.mark.slow
async def test_collaborators_use_the_bulk_port_and_fall_back_to_grpc_streams(
        tmp_path: Path, processes: list[Process]) -> None:
    async with running_director(tmp_path, tls=TLSSettings(insecure=True)) as running:
        for i in range(2):
            processes.append(envoy_process(tmp_path, f"env{i}", running.server.port,
                                           index=i, count=2).start())

        def experiment(name: str) -> tuple[str, float]:
            with DirectorClient(running.address, client_id="alice", timeout=10) as client:
                wait_for(lambda: sum(e.online for e in client.envoys()) == 2, timeout=60,
                         message="two envoys online")
                archive, initial = experiment_archive(Plan(task="digits-logreg", rounds=2))
                client.submit(name, archive, collaborators=["env0", "env1"],
                              initial_model=initial)
                final = client.wait(name, timeout=120)
                return final.status, final.best_metrics["accuracy"]

        bulk_down, bulk_up = sent("BulkDownload"), received("BulkUpload")
        streamed = sent("StreamAggregatedTensor")
        status, accuracy = await asyncio.to_thread(experiment, "over-bulk")
        assert status == "finished" and accuracy > 0.8
        # Every model went over the bulk port: 2 collaborators x 3 fetches, 2 x 2 uploads.
        assert sent("BulkDownload") > bulk_down and received("BulkUpload") > bulk_up
        assert sent("StreamAggregatedTensor") == streamed
        # The director still says where its bulk port is, but nothing answers there (a
        # firewall, a Service without the port): the collaborators use the gRPC streams.
        assert running.server.bulk is not None
        await asyncio.to_thread(running.server.bulk.stop)
        bulk_down = sent("BulkDownload")
        status, accuracy = await asyncio.to_thread(experiment, "over-streams")
        assert status == "finished" and accuracy > 0.8
        assert sent("StreamAggregatedTensor") > streamed
        assert sent("BulkDownload") == bulk_down


class LosesFirstReply(BulkClient):
    """The real bulk client, whose first upload's connection breaks after the director
    has taken the result and before its reply arrives."""

    lost = 0

    def upload(self, header: bytes, segments: Segments) -> bytes:
        reply = super().upload(header, segments)
        if not self.lost:
            self.lost += 1
            raise ConnectionResetError("connection reset before the reply was read")
        return reply


async def test_a_collaborator_whose_upload_reply_was_lost_sends_again_and_goes_on(
        director: RunningDirector) -> None:
    aggregator = await running_experiment(director)
    assert director.server.bulk is not None
    plan = Plan(task="digits-logreg", rounds=2)
    lossy = LosesFirstReply("localhost", director.server.bulk.port, tls=None)
    collaborators = [Collaborator(target=director.address, experiment="exp", name=name,
                                  plan=plan, task=BUILTIN_TASKS["digits-logreg"],
                                  shard=DigitsShard(i, 2), bulk=lossy if i == 0 else None)
                     for i, name in enumerate(("env1", "env2"))]
    repeated = metrics.REPEATED_RESULTS._value.get()
    try:
        trained = await asyncio.wait_for(asyncio.gather(
            *(asyncio.to_thread(c.run) for c in collaborators)), timeout=120)
    finally:
        for c in collaborators:
            c.close()
    # Its resend (over the gRPC streams, as after any bulk failure) was acknowledged.
    assert lossy.lost == 1 and metrics.REPEATED_RESULTS._value.get() == repeated + 1
    assert trained == [2, 2]
    assert aggregator.done and aggregator.error is None
    assert aggregator.round == 2 and aggregator.best_metric is not None


def silent_peers(port: int, count: int) -> list[socket.socket]:
    """Connections that never send a byte (nor, under TLS, a handshake)."""
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]


async def transfer_past_stalled_peers(running: RunningDirector,
                                      cert_dir: CertDir | None = None) -> None:
    """Twice as many silent connections as the port has workers: with a worker each, a
    real transfer would wait for them to time out (HEADER_TIMEOUT_S); it goes through.
    So do peers that reset their connection as soon as it is made."""
    aggregator = await running_experiment(running, cert_dir)
    assert running.server.bulk is not None
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", running.server.bulk.port)) as peer:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stalled = silent_peers(running.server.bulk.port, 2 * BULK_WORKERS)
    try:
        request = aggregator_pb2.GetAggregatedTensorRequest(
            header=header("env1"), tensor_name="weights", round_number=0).SerializeToString()
        client = bulk_client(running, TLSFiles.from_dir(cert_dir.path, "env1")
                             if cert_dir else None)
        reply = await asyncio.wait_for(asyncio.to_thread(client.download, "w", request),
                                       timeout=HEADER_TIMEOUT_S / 2)
        np.testing.assert_array_equal(parse_tensor_response(reply)[1],
                                      aggregator.model["weights"])
    finally:
        for peer in stalled:
            peer.close()


async def test_peers_that_stall_before_their_request_do_not_hold_up_transfers(
        director: RunningDirector) -> None:
    await transfer_past_stalled_peers(director)


async def test_peers_that_never_finish_a_tls_handshake_do_not_hold_up_transfers(
        mtls_director: RunningDirector, cert_dir: CertDir) -> None:
    await transfer_past_stalled_peers(mtls_director, cert_dir)


def cut_off_within(port: int, seconds: float) -> bool:
    """Sends a valid-looking header a byte at a time, 5 per second, forever; whether the
    server closes the connection within `seconds`."""
    request = b"FKB1D" + struct.pack(">I", 1000) + b"x" * 1000
    deadline = time.monotonic() + seconds
    with socket.create_connection(("127.0.0.1", port)) as peer:
        for byte in request:
            if time.monotonic() > deadline:
                return False
            try:
                peer.sendall(bytes([byte]))
                readable, _, _ = select.select([peer], [], [], 0.2)
                if readable and not peer.recv(1):
                    return True  # closed by the server
            except ConnectionError:
                return True
    return False


async def test_a_peer_trickling_its_request_is_cut_off_after_the_header_timeout(
        director: RunningDirector, monkeypatch: pytest.MonkeyPatch) -> None:
    """The header timeout counts from the connection, not from each byte."""
    monkeypatch.setattr("fedkube.transport.bulk.HEADER_TIMEOUT_S", 1.0)
    assert director.server.bulk is not None
    assert await asyncio.to_thread(cut_off_within, director.server.bulk.port, 10.0)


def test_a_certificate_expired_since_its_session_began_is_refused() -> None:
    """A resumed TLS session is not checked against its certificate's dates by TLS."""
    ca = certs.create_ca()
    expired = certs.issue(ca, "env1", role="envoy", validity=dt.timedelta(minutes=-1))
    der = ssl.PEM_cert_to_DER_cert(expired.cert_pem.decode())
    with pytest.raises(BulkError) as error:
        PeerContext(der)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not now" in error.value.details()
    current = certs.issue(ca, "env1", role="envoy")
    auth = PeerContext(ssl.PEM_cert_to_DER_cert(current.cert_pem.decode())).auth_context()
    assert auth["x509_common_name"] == [b"env1"]
