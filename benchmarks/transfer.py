"""Model transfer: fedkube's collaborator path against a raw gRPC byte stream, both on
loopback to a server in another process, insecure and with mTLS.

- fedkube upload: `SendLocalTaskResults` as our collaborator sends it (the array streamed
  from memory in 2 MiB DataStream chunks) to a real director, which reassembles it into
  one buffer, parses it in place and checks it before it replies (the FedAvg update of a
  model-sized result follows the reply).
- fedkube download: `StreamAggregatedTensor` (fedkube's extension beside OpenFL's unary
  `GetAggregatedTensor`) of the same tensor from that director, read as the collaborator
  reads it: chunks joined into a buffer it keeps from round to round, parsed in place.
- Both again over the director's bulk port (fedkube.transport.bulk: the same bytes on a
  plain or TLS socket, received straight into that buffer), which collaborators use when
  the director has one: the "fedkube" column; the gRPC streams are the fallback.
- raw gRPC: a client-streaming upload and a server-streaming download of the same number
  of bytes in 2 MiB messages, with identity (de)serializers: the transport's ceiling.
- OpenFL 1.6 (from its virtualenv, when present): its aggregator's reassembly of a
  streamed result (`openfl.protocols.utils.datastream_to_proto`, which concatenates the
  chunks one by one), timed alone, without the network: an upper bound of its upload.
- Beside it, a plain TCP socket on loopback (sendall from memory, recv_into a warm buffer,
  no protocol): what any transport's upload is bounded by on the machine.

Each figure is the best of two (two training rounds for fedkube; downloads: the best of
both collaborators' fetches over three rounds, so the receive buffers are warm as they
are in a real run from its second round on).

    python -m benchmarks.transfer --mib 16,64,256,1024 [--no-tls] [--json]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
from rich.table import Table

from benchmarks.report import console, emit
from fedkube.api.plan import Plan
from fedkube.client import DirectorClient, experiment_archive
from fedkube.dev.processes import director_process, free_port, port_open, wait_for
from fedkube.proto import (
    aggregator_pb2,
    aggregator_pb2_grpc,
    director_pb2,
    director_pb2_grpc,
    streaming_pb2,
    streaming_pb2_grpc,
)
from fedkube.transport import certs
from fedkube.transport.bulk import BulkClient
from fedkube.transport.channel import open_sync_channel, raw_results_call, raw_tensor_stream
from fedkube.transport.limits import CHUNK_BYTES, SERVER_OPTIONS
from fedkube.transport.tensors import (
    StreamReceiver,
    chunk_frames,
    encode_task_results,
    metric_tensors,
    parse_tensor_response,
)
from fedkube.transport.tls import TLSFiles, server_credentials

MiB = 1 << 20
UPLOAD, DOWNLOAD = "/bench.Raw/Upload", "/bench.Raw/Download"
COLLABORATORS = ("bench1", "bench2")
TASK = b'''
import numpy as np

def init_model(params):
    return {"w": np.zeros(int(params["n"]), np.float32)}

def train(model, data, params):
    return model, {}

def validate(model, data, params):
    return {"accuracy": 0.0}
'''


@dataclass
class Result:
    mode: str
    mib: int
    direction: str
    raw_gb_s: float
    fedkube_gb_s: float  # as collaborators move models: over the bulk port
    stream_gb_s: float  # over fedkube's gRPC streams (no bulk port, or none reachable)

    @property
    def ratio(self) -> float:
        return self.fedkube_gb_s / self.raw_gb_s


# -- the raw byte-stream peer -----------------------------------------------------------

def serve_raw(port: int, cert_dir: Path | None) -> None:
    def upload(chunks: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return sum(len(c) for c in chunks).to_bytes(8, "little")

    def download(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        total = int.from_bytes(request, "little")
        chunk = bytes(CHUNK_BYTES)
        for offset in range(0, total, CHUNK_BYTES):
            yield chunk[:min(CHUNK_BYTES, total - offset)]

    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(4), options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Raw", {
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
        "Download": grpc.unary_stream_rpc_method_handler(download)})])
    address = f"127.0.0.1:{port}"
    if cert_dir:
        server.add_secure_port(address, server_credentials(_tls(cert_dir, "director")))
    else:
        server.add_insecure_port(address)
    server.start()
    server.wait_for_termination()


def _tls(cert_dir: Path, name: str) -> TLSFiles:
    return TLSFiles(ca=(cert_dir / "ca.crt").read_bytes(),
                    cert=(cert_dir / f"{name}.crt").read_bytes(),
                    key=(cert_dir / f"{name}.key").read_bytes())


def _channel(port: int, tls: TLSFiles | None) -> grpc.Channel:
    return open_sync_channel(f"localhost:{port}", tls=tls)


def raw_seconds(port: int, tls: TLSFiles | None, nbytes: int) -> tuple[float, float]:
    """Best-of-two upload and download seconds over a raw byte stream."""
    payload = bytes(nbytes)
    with _channel(port, tls) as channel:
        # Bytes both ways: no (de)serializers.
        up = channel.stream_unary(UPLOAD, None, None)
        down = channel.unary_stream(DOWNLOAD, None, None)
        ups, downs = [], []
        for _ in range(2):
            start = time.perf_counter()
            view = memoryview(payload)
            got = up(bytes(view[i:i + CHUNK_BYTES]) for i in range(0, nbytes, CHUNK_BYTES))
            ups.append(time.perf_counter() - start)
            assert int.from_bytes(got, "little") == nbytes
            start = time.perf_counter()
            received = sum(len(c) for c in down(nbytes.to_bytes(8, "little")))
            downs.append(time.perf_counter() - start)
            assert received == nbytes
    return min(ups), min(downs)


# -- fedkube's path ------------------------------------------------------------------

def fedkube_seconds(port: int, cert_dir: Path | None, mib: int,
                    bulk: bool) -> tuple[float, float]:
    """Best-of-two upload and download seconds of one tensor through a real director,
    over its bulk port (as collaborators do when they can reach it) or gRPC streams.

    Two collaborators; the first to upload is timed, so its figure is the transfer (with
    the director's checks and FedAvg update), not the round turnover that the second
    one's upload sets off (aggregated model, last.pb written, next round opened)."""
    n = mib * MiB // 4
    name = f"bench-{mib}"
    owner_tls = _tls(cert_dir, "owner") if cert_dir else None
    plan = Plan(task="archive:benchtask", rounds=2, params={"n": n}, round_timeout_s=3600)
    archive, initial = experiment_archive(plan, {"benchtask.py": TASK})
    collaborators = {}
    bulk_clients: dict[str, BulkClient] = {}
    for collaborator in COLLABORATORS:
        tls = _tls(cert_dir, collaborator) if cert_dir else None
        director_pb2_grpc.DirectorStub(_channel(port, tls)).UpdateEnvoyStatus(
            director_pb2.UpdateEnvoyStatusRequest(name=collaborator),
            metadata=(("client_id", collaborator),), timeout=10)
        channel = _channel(port, tls)
        collaborators[collaborator] = (
            channel, aggregator_pb2_grpc.AggregatorStub(channel),
            aggregator_pb2.MessageHeader(sender=collaborator, receiver="aggregator",
                                         federation_uuid=name))
        if bulk:  # where the director says, as the collaborator asks
            endpoint = streaming_pb2_grpc.TensorStreamStub(channel).BulkEndpoint(
                streaming_pb2.BulkEndpointRequest(), metadata=(("client_id", collaborator),),
                timeout=10)
            assert endpoint.port, "the director serves no bulk port"
            bulk_clients[collaborator] = BulkClient("localhost", endpoint.port, tls=tls)
    update = np.full(n, 0.5, np.float32)
    receivers = {collaborator: StreamReceiver() for collaborator in COLLABORATORS}
    ups, downs = [], []
    with DirectorClient(f"localhost:{port}", tls=owner_tls, client_id="owner",
                        timeout=600) as client:
        client.submit(name, archive, collaborators=list(COLLABORATORS), initial_model=initial)
        wait_for(lambda: client.status(name).status == "in_progress", timeout=60)
        for r in range(3):
            for collaborator, (channel, stub, header) in collaborators.items():
                metadata = (("client_id", collaborator),)
                # The last upload of a round returns before the round closes (its add
                # runs after the reply): ask again, as a collaborator does, until it opens.
                tasks = stub.GetTasks(aggregator_pb2.GetTasksRequest(header=header),
                                      metadata=metadata, timeout=60)
                while tasks.round_number < r:
                    time.sleep(0.005)
                    tasks = stub.GetTasks(aggregator_pb2.GetTasksRequest(header=header),
                                          metadata=metadata, timeout=60)
                assert tasks.round_number == r, tasks
                start = time.perf_counter()
                # As the collaborator fetches it: into its reused buffer, parsed in place.
                request = aggregator_pb2.GetAggregatedTensorRequest(
                    header=header, tensor_name="w", round_number=r)
                if bulk:
                    received = bulk_clients[collaborator].download(
                        "w", request.SerializeToString())
                else:
                    received = receivers[collaborator].receive("w", raw_tensor_stream(channel)(
                        request, metadata=metadata, timeout=600))
                values = parse_tensor_response(received)[1]
                downs.append(time.perf_counter() - start)
                assert values.size == n
                for task in tasks.tasks:
                    start = time.perf_counter()
                    validate = task.name == "validate"
                    results = aggregator_pb2.TaskResults(
                        header=header, round_number=r, task_name=task.name, data_size=1,
                        tensors=list(metric_tensors({"accuracy": 0.0}, r)) if validate else [])
                    # As the collaborator sends them: the array streamed from memory.
                    segments = encode_task_results(results, [] if validate else [("w", update)])
                    if bulk and not validate:
                        bulk_clients[collaborator].upload(header.SerializeToString(),
                                                          segments)
                    else:
                        raw_results_call(channel)(chunk_frames(segments, CHUNK_BYTES),
                                                  metadata=metadata, timeout=600)
                    if task.name == "train" and collaborator == COLLABORATORS[0]:
                        ups.append(time.perf_counter() - start)
        assert client.wait(name, timeout=600).status == "finished"
        client.remove(name)
    for channel, _, _ in collaborators.values():
        channel.close()
    return min(ups), min(downs)


def run_mode(mode: str, sizes: list[int], work: Path) -> list[Result]:
    cert_dir = None
    if mode == "mtls":
        cert_dir = work / "certs"
        ca = certs.load_or_create_ca(cert_dir)
        certs.write_pair(cert_dir, "director", certs.issue(ca, "localhost",
                                                           hosts=["127.0.0.1"], role="director"))
        for user in ("owner", *COLLABORATORS):
            certs.write_pair(cert_dir, user, certs.issue(
                ca, user, role="owner" if user == "owner" else "envoy"))
    director_port, raw_port = free_port(), free_port()
    director = director_process(work / mode, director_port, period=60.0,
                                cert_dir=cert_dir).start()
    raw = subprocess.Popen([sys.executable, "-m", "benchmarks.transfer", "--serve-raw",
                            str(raw_port), *(["--certs", str(cert_dir)] if cert_dir else [])])
    results = []
    try:
        wait_for(lambda: port_open(director_port) and port_open(raw_port), timeout=30)
        for collaborator in COLLABORATORS:
            tls = _tls(cert_dir, collaborator) if cert_dir else None
            director_pb2_grpc.DirectorStub(
                _channel(director_port, tls)).UpdateShardInfo(
                director_pb2.UpdateShardInfoRequest(shard_info=director_pb2.ShardInfo(
                    node_info=director_pb2.NodeInfo(name=collaborator), n_samples=1,
                    sample_shape=["8", "8"], target_shape=["1"])),
                metadata=(("client_id", collaborator),), timeout=10)
        bench_tls = _tls(cert_dir, COLLABORATORS[0]) if cert_dir else None
        for mib in sizes:
            raw_up, raw_down = raw_seconds(raw_port, bench_tls, mib * MiB)
            fk_up, fk_down = fedkube_seconds(director_port, cert_dir, mib, bulk=True)
            st_up, st_down = fedkube_seconds(director_port, cert_dir, mib, bulk=False)
            gb = mib * MiB / 1e9
            results += [Result(mode, mib, "upload", round(gb / raw_up, 3), round(gb / fk_up, 3),
                               round(gb / st_up, 3)),
                        Result(mode, mib, "download", round(gb / raw_down, 3),
                               round(gb / fk_down, 3), round(gb / st_down, 3))]
            print(f"{mode} {mib} MiB done", file=sys.stderr)
    finally:
        raw.kill()
        raw.wait()
        director.stop()
    return results


# -- OpenFL 1.6's reassembly ------------------------------------------------------------

OPENFL_REASSEMBLY = """
import logging, sys, time
import numpy as np
from openfl.protocols import aggregator_pb2, base_pb2, utils

n = int(sys.argv[1]) * (1 << 20) // 4
tensor = base_pb2.NamedTensor(name="w", data_bytes=np.full(n, 0.5, np.float32).tobytes())
results = aggregator_pb2.TaskResults(round_number=0, task_name="train", data_size=1,
                                     tensors=[tensor])
chunks = list(utils.proto_to_datastream(results, logging.getLogger()))
start = time.perf_counter()
utils.datastream_to_proto(aggregator_pb2.TaskResults(), iter(chunks))
print(time.perf_counter() - start)
"""
OPENFL_MAX_MIB = 256  # quadratic: 1 GiB would copy about 256 GiB and take minutes


def openfl_reassembly_gb_s(python: Path, mib: int) -> float:
    """OpenFL 1.6's aggregator receive path for a streamed result, alone (no network):
    `openfl.protocols.utils.datastream_to_proto` on the chunks its collaborator sends."""
    seconds = float(subprocess.run([str(python), "-c", OPENFL_REASSEMBLY, str(mib)],
                                   capture_output=True, text=True, check=True,
                                   timeout=1800).stdout.strip().splitlines()[-1])
    return mib * MiB / 1e9 / seconds


def plain_socket_gb_s(mib: int) -> float:
    """What TCP on loopback carries at all: a payload sent with sendall from memory and
    received with recv_into into a warm buffer, no protocol, best of 20. No transport can
    upload faster on this machine, whatever its format."""
    nbytes = mib * MiB
    listener = socket.create_server(("127.0.0.1", 0))

    def receive() -> None:
        conn, _ = listener.accept()
        with conn:
            buffer = memoryview(bytearray(nbytes))
            while True:
                got = 0
                while got < nbytes:
                    n = conn.recv_into(buffer[got:])
                    if not n:
                        return
                    got += n
                conn.sendall(b"k")

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    payload = memoryview(bytearray(nbytes))
    times = []
    with socket.create_connection(listener.getsockname()) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(20):
            start = time.perf_counter()
            conn.sendall(payload)
            conn.recv(1)
            times.append(time.perf_counter() - start)
    receiver.join(timeout=10)
    listener.close()
    return nbytes / min(times) / 1e9


def table(results: list[Result], as_json: bool = False) -> None:
    view = Table(title="Model transfer on loopback (GB/s, best of two)")
    for column in ("TLS", "MiB", "direction", "raw gRPC", "fedkube", "fedkube / raw",
                   "fedkube gRPC streams", "streams / raw"):
        view.add_column(column, justify="right")
    for r in results:
        view.add_row(r.mode, str(r.mib), r.direction, f"{r.raw_gb_s:.2f}",
                     f"{r.fedkube_gb_s:.2f}", f"{r.ratio:.2f}x", f"{r.stream_gb_s:.2f}",
                     f"{r.stream_gb_s / r.raw_gb_s:.2f}x")
    console(as_json, width=140).print(view)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", default="16,64,256,1024")
    parser.add_argument("--no-tls", action="store_true", help="insecure only")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--openfl-python", type=Path, default=Path(os.environ.get(
        "FEDKUBE_OPENFL_PYTHON", Path.home() / ".cache/fedkube/openfl-1.6-venv/bin/python")),
        help="OpenFL 1.6's virtualenv python, for its reassembly (skipped when missing)")
    parser.add_argument("--serve-raw", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_raw:
        serve_raw(args.serve_raw, args.certs)
        return
    sizes = [int(s) for s in args.mib.split(",")]
    modes = ["insecure"] if args.no_tls else ["insecure", "mtls"]
    with tempfile.TemporaryDirectory(prefix="fedkube-transfer-") as tmp:
        results = [r for mode in modes for r in run_mode(mode, sizes, Path(tmp))]
    table(results, args.json)
    openfl: dict[int, float] = {}
    plain: dict[int, float] = {}
    if args.openfl_python.exists():
        view = Table(title="Upload: fedkube's whole upload vs OpenFL 1.6's chunk reassembly "
                     "alone (GB/s), and what a plain TCP socket carries at all")
        for column in ("MiB", "fedkube upload (insecure)", "OpenFL reassembly",
                       "fedkube / OpenFL", "20x OpenFL", "plain TCP socket"):
            view.add_column(column, justify="right")
        for r in results:
            if r.mode == "insecure" and r.direction == "upload" and r.mib <= OPENFL_MAX_MIB:
                openfl[r.mib] = round(openfl_reassembly_gb_s(args.openfl_python, r.mib), 4)
                plain[r.mib] = round(plain_socket_gb_s(r.mib), 3)
                view.add_row(str(r.mib), f"{r.fedkube_gb_s:.2f}", f"{openfl[r.mib]:.3f}",
                             f"{r.fedkube_gb_s / openfl[r.mib]:.0f}x",
                             f"{20 * openfl[r.mib]:.2f}", f"{plain[r.mib]:.2f}")
        console(args.json).print(view)
    if args.json:
        emit("transfer", [{**asdict(r), "ratio": round(r.ratio, 3)} for r in results],
             openfl_reassembly_gb_s=openfl, plain_socket_gb_s=plain)


if __name__ == "__main__":
    main()
