"""Hostile input: generated requests against a real director process, generated archives
against the extractor, and the named attacks one by one. Nothing may crash the director or
end a call without a clear status; nothing may escape the extraction directory."""

from __future__ import annotations

import io
import shutil
import stat
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedkube.api.plan import Plan
from fedkube.client import DirectorClient, experiment_archive
from fedkube.dev.processes import Process, director_process, free_port, port_open, wait_for
from fedkube.proto import aggregator_pb2, base_pb2, director_pb2
from fedkube.tasks.archive import ArchiveError, safe_extract
from fedkube.transport.channel import open_sync_channel
from fedkube.transport.tensors import chunk_message
from tests.helpers import served_rpcs

# A director process, and 11,000 generated inputs: none of it is for the fast loop.
pytestmark = pytest.mark.slow
RPC_EXAMPLES = 6000
ARCHIVE_EXAMPLES = 5000  # 11,000 generated inputs in all
# Calls with bytes in and out, as a hostile client sends them (grpc-stubs asks for both).
RAW: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}

# Clear answers to bad input. UNKNOWN would mean a handler raised something unhandled;
# INTERNAL is gRPC's own answer to bytes that do not parse as the request message.
CLEAR = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
         grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED,
         grpc.StatusCode.DEADLINE_EXCEEDED}

_METHODS = [(path, method.client_streaming, method.server_streaming)
            for path, method in served_rpcs()]

NAMES = st.sampled_from(["env1", "env2", "fuzz", "", "../etc", "x" * 300, "\x00", "é"])


@st.composite
def tensors(draw: st.DrawFn) -> base_pb2.NamedTensor:
    """Tensors right, wrong, and absurd: names, shapes, dtypes, data, NaN/Inf."""
    shape = draw(st.sampled_from([[64, 10], [10], [1], [], [0], [-1, 3], [(1 << 31) - 1, 2]]))
    data = draw(st.one_of(
        st.binary(max_size=64),
        st.sampled_from([np.full(640, np.nan, np.float32).tobytes(),
                         np.full(10, np.inf, np.float32).tobytes(),
                         np.zeros(640, np.float32).tobytes(), np.zeros(10, np.float64).tobytes()])))
    metadata = [base_pb2.MetadataProto(int_to_float={1: 1.0}, int_list=shape, bool_list=[True])]
    return base_pb2.NamedTensor(
        name=draw(st.sampled_from(["weights", "bias", "accuracy", "", "x" * 1000])),
        round_number=draw(st.integers(-2, 3)), lossless=draw(st.booleans()),
        report=draw(st.booleans()), tags=draw(st.lists(st.text(max_size=5), max_size=2)),
        transformer_metadata=draw(st.lists(st.just(metadata[0]), max_size=2)), data_bytes=data)


@st.composite
def task_results(draw: st.DrawFn) -> bytes:
    header = aggregator_pb2.MessageHeader(sender=draw(NAMES), receiver="aggregator",
                                          federation_uuid=draw(NAMES))
    results = aggregator_pb2.TaskResults(
        header=header, round_number=draw(st.integers(-1, 3)),
        task_name=draw(st.sampled_from(["train", "validate", "", "rm -rf"])),
        data_size=draw(st.integers(-(1 << 31), (1 << 31) - 1)),
        tensors=draw(st.lists(tensors(), max_size=4)))
    return results.SerializeToString()


def _mutated(data: bytes, cuts: list[int], flips: list[tuple[int, int]]) -> bytes:
    buffer = bytearray(data)
    for position, value in flips:
        if buffer:
            buffer[position % len(buffer)] = value
    for cut in cuts[:1]:
        buffer = buffer[:cut % (len(buffer) + 1)]
    return bytes(buffer)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bool, bool, list[bytes]]:
    path, client_streaming, server_streaming = draw(st.sampled_from(_METHODS))
    if path.endswith("SendLocalTaskResults"):
        # The stream carries a TaskResults in DataStream chunks (whole or cut anywhere).
        body = draw(st.one_of(task_results(), st.binary(max_size=512)))
        size = draw(st.integers(1, max(1, len(body))))
        payloads = [chunk.SerializeToString() for chunk in chunk_message(body, size)]
        payloads = payloads[:50] or [b""]
    else:
        valid = _valid_example(path)
        raw = draw(st.one_of(
            st.binary(max_size=256),
            st.just(valid),
            st.builds(_mutated, st.just(valid), st.lists(st.integers(0, 1 << 16), max_size=1),
                      st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                               max_size=4))))
        payloads = [raw] * (draw(st.integers(1, 3)) if client_streaming else 1)
    return path, client_streaming, server_streaming, payloads


def _valid_example(path: str) -> bytes:
    """A well-formed request for each RPC, naming the fuzz experiment and its shards."""
    name = path.rsplit("/", 1)[1]
    header = aggregator_pb2.MessageHeader(sender="env1", federation_uuid="fuzz")
    examples: dict[str, Any] = {
        "UpdateShardInfo": director_pb2.UpdateShardInfoRequest(shard_info=director_pb2.ShardInfo(
            node_info=director_pb2.NodeInfo(name="env3"), n_samples=1,
            sample_shape=["8", "8"], target_shape=["1"])),
        "UpdateEnvoyStatus": director_pb2.UpdateEnvoyStatusRequest(name="env1"),
        "GetExperimentData": director_pb2.GetExperimentDataRequest(experiment_name="fuzz",
                                                                   collaborator_name="env1"),
        "SetNewExperiment": director_pb2.ExperimentInfo(
            name="fuzz-new", collaborator_names=["env1"],
            experiment_data=director_pb2.ExperimentData(size=3, npbytes=b"PK\x03")),
        "GetTrainedModel": director_pb2.GetTrainedModelRequest(experiment_name="fuzz"),
        "GetMetricStream": director_pb2.GetMetricStreamRequest(experiment_name="nope"),
        "GetTasks": aggregator_pb2.GetTasksRequest(header=header),
        "GetAggregatedTensor": aggregator_pb2.GetAggregatedTensorRequest(
            header=header, tensor_name="weights", round_number=0),
        "StreamAggregatedTensor": aggregator_pb2.GetAggregatedTensorRequest(
            header=header, tensor_name="weights", round_number=0),
        "SetExperimentFailed": director_pb2.SetExperimentFailedRequest(
            experiment_name="fuzz-other", collaborator_name="env2"),
    }
    message = examples.get(name)
    return message.SerializeToString() if message is not None else b""


@pytest.fixture(scope="module")
def fuzz_director(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, str]]:
    """A director process with two shards and one running experiment that no collaborator
    works on, so results for it reach the aggregator's checks."""
    work = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    director = director_process(work, port, period=600.0).start()
    try:
        wait_for(lambda: port_open(port), timeout=30, message="director up")
        address = f"localhost:{port}"
        channel = open_sync_channel(address, tls=None)
        for shard in ("env1", "env2"):
            channel.unary_unary("/openfl.director.Director/UpdateShardInfo", **RAW)(
                director_pb2.UpdateShardInfoRequest(shard_info=director_pb2.ShardInfo(
                    node_info=director_pb2.NodeInfo(name=shard), n_samples=1,
                    sample_shape=["8", "8"], target_shape=["1"])).SerializeToString())
        channel.close()
        with DirectorClient(address, client_id="owner") as client:
            for name in ("fuzz", "fuzz-other"):
                archive, initial = experiment_archive(Plan(task="digits-logreg", rounds=3,
                                                           round_timeout_s=3600))
                client.submit(name, archive, collaborators=["env1"] if name == "fuzz" else
                              ["env2"], initial_model=initial)
        yield director, address
    finally:
        director.stop()


def _send(channel: grpc.Channel, path: str, client_streaming: bool, server_streaming: bool,
          payloads: list[bytes]) -> grpc.StatusCode:
    metadata = (("client_id", "owner"),)
    try:
        if not client_streaming and not server_streaming:
            channel.unary_unary(path, **RAW)(payloads[0], timeout=2, metadata=metadata)
        elif client_streaming and not server_streaming:
            channel.stream_unary(path, **RAW)(iter(payloads), timeout=2, metadata=metadata)
        elif server_streaming and not client_streaming:
            for _ in channel.unary_stream(path, **RAW)(payloads[0], timeout=2, metadata=metadata):
                pass
        else:
            for _ in channel.stream_stream(path, **RAW)(iter(payloads), timeout=2,
                                                        metadata=metadata):
                pass
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        details = exc.details() or ""
        if code == grpc.StatusCode.INTERNAL and "deserializ" in details.lower():
            return grpc.StatusCode.INVALID_ARGUMENT  # unparseable bytes, refused by gRPC
        assert code in CLEAR, (path, code, details)
        assert details, (path, code)  # every refusal says why
        return code
    return grpc.StatusCode.OK


def test_generated_requests_never_crash_the_director(fuzz_director: tuple[Process, str]
                                                     ) -> None:
    director, address = fuzz_director
    channel = open_sync_channel(address, tls=None)
    seen: dict[grpc.StatusCode, int] = {}

    @settings(max_examples=RPC_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(requests())
    def one(request: tuple[str, bool, bool, list[bytes]]) -> None:
        code = _send(channel, *request)
        seen[code] = seen.get(code, 0) + 1

    one()
    channel.close()
    assert sum(seen.values()) >= RPC_EXAMPLES
    # The generator reached past the parser into the handlers' own checks.
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 100
    assert seen.get(grpc.StatusCode.NOT_FOUND, 0) > 100
    assert seen.get(grpc.StatusCode.PERMISSION_DENIED, 0) > 10
    assert director.running
    assert "Traceback" not in director.output(), director.output()[-3000:]
    # ...and it still serves: the fuzz experiment is intact.
    with DirectorClient(address, client_id="owner") as client:
        assert client.status("fuzz").status == "in_progress"
        assert {e.name for e in client.envoys()} >= {"env1", "env2"}


# -- archives -------------------------------------------------------------------------------

MEMBER_NAMES = st.one_of(
    st.sampled_from(["plan.yaml", "task.py", "../escape.py", "/etc/passwd", "a/../../b",
                     "a/b/c.txt", "C:\\windows\\x", "./ok.txt", "", "a//b", "dir/", "\x00x",
                     "..", "a/..", "~/.ssh/id"]),
    st.text(min_size=1, max_size=30))


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore")  # duplicate member names are part of the attack
        for _ in range(draw(st.integers(0, 5))):
            info = zipfile.ZipInfo(draw(MEMBER_NAMES))
            kind = draw(st.sampled_from([0, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR,
                                         stat.S_IFBLK, stat.S_IFIFO, stat.S_IFDIR]))
            info.external_attr = (kind | 0o644) << 16
            info.compress_type = draw(st.sampled_from([zipfile.ZIP_STORED,
                                                       zipfile.ZIP_DEFLATED]))
            try:
                archive.writestr(info, draw(st.binary(max_size=200)))
            except (ValueError, UnicodeEncodeError):
                continue
    data = buffer.getvalue()
    return draw(st.one_of(st.just(data), st.builds(
        _mutated, st.just(data), st.lists(st.integers(0, 1 << 12), max_size=1),
        st.lists(st.tuples(st.integers(0, 1 << 12), st.integers(0, 255)), max_size=6)),
        st.binary(max_size=300)))


def test_generated_archives_extract_safely_or_are_refused(tmp_path: Path) -> None:
    outcomes = {"extracted": 0, "refused": 0}

    @settings(max_examples=ARCHIVE_EXAMPLES, deadline=None, database=None,
              derandomize=True, suppress_health_check=list(HealthCheck))
    @given(archives())
    def one(data: bytes) -> None:
        root = tmp_path / "case"
        shutil.rmtree(root, ignore_errors=True)
        dest = root / "dest"
        dest.mkdir(parents=True)
        try:
            written = safe_extract(data, dest)
        except ArchiveError as exc:
            assert str(exc)
            outcomes["refused"] += 1
        else:
            outcomes["extracted"] += 1
            for path in written:
                assert path.resolve().is_relative_to(dest.resolve())
        # Nothing escaped: the only thing beside dest is dest.
        assert [p.name for p in root.iterdir()] == ["dest"]
        for path in dest.rglob("*"):
            assert not path.is_symlink() and (path.is_file() or path.is_dir())

    one()
    assert outcomes["extracted"] > 100 and outcomes["refused"] > 100, outcomes


# -- the named attacks, one by one ------------------------------------------------------------

def _status(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_named_attacks_get_clear_statuses(fuzz_director: tuple[Process, str]) -> None:
    director, address = fuzz_director
    channel = open_sync_channel(address, tls=None)

    def unary(path: str) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
        return channel.unary_unary(path, **RAW)

    # An oversize unary message: refused before any handler sees it.
    huge = director_pb2.UpdateShardInfoRequest(shard_info=director_pb2.ShardInfo(
        shard_description="x" * (65 << 20))).SerializeToString()
    code, details = _status(lambda: unary("/openfl.director.Director/UpdateShardInfo")(
        huge, timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    # An oversize results stream: cut off at a few times the model's size.
    results = aggregator_pb2.TaskResults(
        header=aggregator_pb2.MessageHeader(sender="env1", federation_uuid="fuzz"),
        round_number=0, task_name="train", data_size=1,
        tensors=[base_pb2.NamedTensor(name="weights", data_bytes=bytes(8 << 20))])
    code, details = _status(lambda: channel.stream_unary(
        "/openfl.aggregator.Aggregator/SendLocalTaskResults", **RAW)(
        (c.SerializeToString() for c in chunk_message(results.SerializeToString(), 1 << 20)),
        timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "exceeds" in details, details
    # Huge metadata: refused by the transport, the director unharmed.
    code, details = _status(lambda: unary("/openfl.director.Director/GetEnvoys")(
        b"", timeout=10, metadata=(("client_id", "owner"), ("x-junk", "j" * (1 << 20)))))
    assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                    grpc.StatusCode.UNAVAILABLE), (code, details)
    # Results for an unknown experiment, and a replay for a round that is not open.
    for experiment, round_number, expected in (("no-such", 0, grpc.StatusCode.NOT_FOUND),
                                               ("fuzz", 7, grpc.StatusCode.INVALID_ARGUMENT)):
        replay = aggregator_pb2.TaskResults(
            header=aggregator_pb2.MessageHeader(sender="env1", federation_uuid=experiment),
            round_number=round_number, task_name="validate", data_size=1)
        code, details = _status(lambda r=replay: channel.stream_unary(
            "/openfl.aggregator.Aggregator/SendLocalTaskResults", **RAW)(
            (c.SerializeToString() for c in chunk_message(r.SerializeToString(), 1 << 20)),
            timeout=10))
        assert code == expected, (code, details)
        assert experiment in details or "round" in details
    channel.close()
    with DirectorClient(address, client_id="owner") as client:
        assert client.status("fuzz").status == "in_progress"
    assert director.running
