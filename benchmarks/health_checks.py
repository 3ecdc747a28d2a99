"""Health checks at scale: fedkube's director vs OpenFL 1.6's, same load client, same run.

One asyncio client speaks the OpenFL wire protocol for N simulated envoys: it registers
them all (UpdateShardInfo), then each sends UpdateEnvoyStatus every PERIOD seconds with a
random phase. We record the registration rate, the latency of every health check, and the
director's CPU time (from /proc) over the measured window.

    python -m benchmarks.health_checks --envoys 5000 --period 2 --duration 20 [--json]
        [--directors fedkube,openfl,grpc-floor] [--clients N]

grpc-floor is an empty grpc.aio server (constant replies): what the framework itself
allows on the machine; fedkube+N is the director with N frontend processes sharing its
port (fedkube.director.frontend_process), whose CPU is counted with the director's. --clients N
spreads the load over N client processes, for machines with the cores to offer more calls
than one asyncio client can.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from google.protobuf.duration_pb2 import Duration

from benchmarks.report import console, emit
from fedkube.dev.processes import child_pids, free_port, port_open, wait_for
from fedkube.proto import director_pb2, director_pb2_grpc

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_OPENFL_PYTHON = Path.home() / ".cache/fedkube/openfl-1.6-venv/bin/python"


@dataclass
class Result:
    director: str
    envoys: int
    period_s: float
    calls_per_s: float
    registration_per_s: float
    registration_cpu_us: float  # the director's CPU per registration (its frontends' too)
    registration_main_cpu_us: float  # the director process's alone (frontends relay to it)
    p50_ms: float
    p99_ms: float
    cpu_percent: float
    main_cpu_percent: float  # the director process's alone (its frontends answer the rest)
    errors: int


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (a director's frontends)."""
    total = cpu_seconds(pid)
    for child in child_pids(pid):
        with contextlib.suppress(OSError):  # ended since
            total += cpu_seconds(child)
    return total


def frontends_of(kind: str) -> int:
    """fedkube+N: a director with N frontends."""
    return int(kind.partition("+")[2] or 0)


def start_fedkube(work: Path, port: int, period: float,
                  frontends: int = 0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedkube.cli", "--log-level", "warning", "director", "start",
         "--insecure", "--host", "127.0.0.1", "--port", str(port), "--data-dir",
         str(work / "fedkube-data"), "--health-check-period", str(period),
         "--frontends", str(frontends)],
        stdout=subprocess.DEVNULL, stderr=(work / "fedkube.log").open("wb"))


def start_openfl(work: Path, port: int, period: float, python: Path) -> subprocess.Popen[bytes]:
    (work / "director_config.yaml").write_text(
        f"settings:\n  listen_host: 127.0.0.1\n  listen_port: {port}\n"
        f"  sample_shape: ['8', '8']\n  target_shape: ['1']\n"
        f"  envoy_health_check_period: {max(1, int(period))}\n")
    return subprocess.Popen(
        [str(python.parent / "fx"), "director", "start", "--disable-tls", "-c",
         "director_config.yaml"], cwd=work, stdout=subprocess.DEVNULL,
        stderr=(work / "openfl.log").open("wb"))


def serve_floor(port: int) -> None:
    """The framework's floor: a grpc.aio server on the director's event loop that answers
    both RPCs with constant wire bytes, parsing nothing and storing nothing. No director
    built on grpc.aio serves more calls per CPU second than this."""
    from fedkube.startup import server_loop_factory

    accepted = director_pb2.UpdateShardInfoResponse(accepted=True).SerializeToString()
    healthy = director_pb2.UpdateEnvoyStatusResponse(
        health_check_period=Duration(seconds=10)).SerializeToString()

    async def register(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return accepted

    async def health(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return healthy

    async def serve() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "openfl.director.Director", {
                "UpdateShardInfo": grpc.unary_unary_rpc_method_handler(register),
                "UpdateEnvoyStatus": grpc.unary_unary_rpc_method_handler(health)})])
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    with asyncio.Runner(loop_factory=server_loop_factory()) as runner:
        runner.run(serve())


def start_floor(work: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.health_checks", "--serve-floor",
                             str(port)], stdout=subprocess.DEVNULL,
                            stderr=(work / "floor.log").open("wb"))


def shard(i: int) -> director_pb2.UpdateShardInfoRequest:
    return director_pb2.UpdateShardInfoRequest(shard_info=director_pb2.ShardInfo(
        node_info=director_pb2.NodeInfo(name=f"envoy-{i:05d}"), shard_description="load",
        n_samples=100, sample_shape=["8", "8"], target_shape=["1"]))


# Registrations in flight, across all client processes, as in earlier runs. (Past 1,000
# waiting calls a gRPC server with default options, like the floor's, cancels some; the
# director raises that limit: fedkube.transport.limits.)
IN_FLIGHT = 512
CONNECTIONS = 64  # default, across all client processes (--connections)


async def _register(stubs: list[director_pb2_grpc.DirectorAsyncStub], envoys: range,
                    in_flight: int = IN_FLIGHT) -> None:
    limit = asyncio.Semaphore(in_flight)

    async def register(i: int) -> None:
        async with limit:
            response = await stubs[i % len(stubs)].UpdateShardInfo(shard(i), timeout=60)
            assert response.accepted

    await asyncio.gather(*(register(i) for i in envoys))


async def _health_checks(stubs: list[director_pb2_grpc.DirectorAsyncStub], envoys: range, *,
                         period: float, window: tuple[float, float]) -> tuple[list[float], int]:
    """Each envoy checks in every period until the window (wall-clock times) ends;
    returns the latencies of the calls made inside it and the failed calls."""
    latencies: list[float] = []
    errors = 0
    window_start, window_end = window

    async def envoy(i: int) -> None:
        nonlocal errors
        stub = stubs[i % len(stubs)]
        request = director_pb2.UpdateEnvoyStatusRequest(name=f"envoy-{i:05d}")
        next_at = time.time() + random.uniform(0, period)
        while True:
            await asyncio.sleep(max(0.0, next_at - time.time()))
            now = time.time()
            if now > window_end:
                return
            try:
                await stub.UpdateEnvoyStatus(request, timeout=10)
                if now >= window_start:
                    latencies.append(time.time() - now)
            except grpc.aio.AioRpcError:
                errors += 1
            next_at += period

    await asyncio.gather(*(envoy(i) for i in envoys))
    return latencies, errors


def _stubs(port: int, channels: int) -> tuple[list[grpc.aio.Channel],
                                              list[director_pb2_grpc.DirectorAsyncStub]]:
    # A connection each, as envoys have: channels of one process would otherwise share
    # one, and a director's frontends get a share of the connections, not of the calls.
    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                       options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(channels)]
    return chans, [director_pb2_grpc.DirectorStub(c) for c in chans]


async def load(port: int, pid: int, *, envoys: int, period: float, duration: float,
               warmup: float, channels: int = CONNECTIONS
               ) -> tuple[float, tuple[float, float], list[float], tuple[float, float], int]:
    """Returns (registrations/s, director CPU s for them (all its processes, the director
    process alone), health latencies in s, director CPU s in window (the same two),
    errors)."""
    chans, stubs = _stubs(port, channels)
    started, cpu_started = time.perf_counter(), (tree_cpu_seconds(pid), cpu_seconds(pid))
    await _register(stubs, range(envoys))
    registration_rate = envoys / (time.perf_counter() - started)
    registration_cpu = (tree_cpu_seconds(pid) - cpu_started[0],
                        cpu_seconds(pid) - cpu_started[1])
    window = (time.time() + warmup, time.time() + warmup + duration)
    checks = asyncio.create_task(_health_checks(stubs, range(envoys), period=period,
                                                window=window))
    await asyncio.sleep(max(0.0, window[0] - time.time()))
    cpu_before = (tree_cpu_seconds(pid), cpu_seconds(pid))
    await asyncio.sleep(max(0.0, window[1] - time.time()))
    cpu_used = (tree_cpu_seconds(pid) - cpu_before[0], cpu_seconds(pid) - cpu_before[1])
    latencies, errors = await checks
    for channel in chans:
        await channel.close(None)
    return registration_rate, registration_cpu, latencies, cpu_used, errors


def client_process(port: int, share: int, clients: int, envoys: int, period: float,
                   connections: int) -> None:
    """One of several load-client processes (--clients): registers envoys share, share +
    clients, ...; says so on stdout; reads the window's wall-clock start and end from
    stdin; runs their health checks and prints its latencies and errors as JSON."""
    async def run() -> None:
        chans, stubs = _stubs(port, max(1, connections // clients))
        mine = range(share, envoys, clients)
        await _register(stubs, mine, max(1, IN_FLIGHT // clients))
        print("registered", flush=True)
        loop = asyncio.get_running_loop()
        line = await loop.run_in_executor(None, sys.stdin.readline)
        start, end = (float(v) for v in line.split())
        latencies, errors = await _health_checks(stubs, mine, period=period,
                                                 window=(start, end))
        print(json.dumps({"latencies": latencies, "errors": errors}), flush=True)
        for channel in chans:
            await channel.close(None)

    asyncio.run(run())


def load_processes(port: int, pid: int, *, clients: int, envoys: int, period: float,
                   duration: float, warmup: float, connections: int = CONNECTIONS
                   ) -> tuple[float, tuple[float, float], list[float], tuple[float, float], int]:
    """load() spread over several client processes, for machines whose cores would let
    the director serve more than one client process can offer."""
    started, cpu_started = time.perf_counter(), (tree_cpu_seconds(pid), cpu_seconds(pid))
    children = [subprocess.Popen(
        [sys.executable, "-m", "benchmarks.health_checks", "--client-of", str(port),
         "--share", f"{k}/{clients}", "--envoys", str(envoys), "--period", str(period),
         "--connections", str(connections)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for k in range(clients)]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "registered", "a client failed"
        registration_rate = envoys / (time.perf_counter() - started)
        registration_cpu = (tree_cpu_seconds(pid) - cpu_started[0],
                            cpu_seconds(pid) - cpu_started[1])
        window = (time.time() + warmup, time.time() + warmup + duration)
        for child in children:
            assert child.stdin is not None
            child.stdin.write(f"{window[0]} {window[1]}\n")
            child.stdin.flush()
        time.sleep(max(0.0, window[0] - time.time()))
        cpu_before = (tree_cpu_seconds(pid), cpu_seconds(pid))
        time.sleep(max(0.0, window[1] - time.time()))
        cpu_used = (tree_cpu_seconds(pid) - cpu_before[0], cpu_seconds(pid) - cpu_before[1])
        latencies: list[float] = []
        errors = 0
        for child in children:
            assert child.stdout is not None
            report = json.loads(child.stdout.readline())
            latencies += report["latencies"]
            errors += report["errors"]
    finally:
        for child in children:
            child.kill()
            child.wait()
    return registration_rate, registration_cpu, latencies, cpu_used, errors


def serving(port: int) -> bool:
    """Whether the server answers calls (an open port is not enough: a server that has
    bound it but not started cancels them)."""
    if not port_open(port):
        return False
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = director_pb2_grpc.DirectorStub(channel)
        try:
            stub.UpdateEnvoyStatus(director_pb2.UpdateEnvoyStatusRequest(name="probe"),
                                   timeout=5)
        except grpc.RpcError as exc:
            return exc.code() not in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.CANCELLED)
    return True


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def measure(kind: str, *, envoys: int, period: float, duration: float, warmup: float,
            openfl_python: Path, clients: int = 1, connections: int = CONNECTIONS) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        work, port = Path(tmp), free_port()
        process = (start_fedkube(work, port, period, frontends_of(kind))
                   if kind.startswith("fedkube")
                   else start_floor(work, port) if kind == "grpc-floor"
                   else start_openfl(work, port, period, openfl_python))
        try:
            wait_for(lambda: serving(port), timeout=60, message=f"{kind} director")
            if clients > 1:
                rate, registration_cpu, latencies, cpu, errors = load_processes(
                    port, process.pid, clients=clients, envoys=envoys, period=period,
                    duration=duration, warmup=warmup, connections=connections)
            else:
                rate, registration_cpu, latencies, cpu, errors = asyncio.run(load(
                    port, process.pid, envoys=envoys, period=period, duration=duration,
                    warmup=warmup, channels=connections))
        finally:
            process.terminate()
            process.wait(timeout=30)
    return Result(director=kind, envoys=envoys, period_s=period,
                  calls_per_s=len(latencies) / duration, registration_per_s=rate,
                  registration_cpu_us=registration_cpu[0] / envoys * 1e6,
                  registration_main_cpu_us=registration_cpu[1] / envoys * 1e6,
                  p50_ms=percentile(latencies, 0.50) * 1e3,
                  p99_ms=percentile(latencies, 0.99) * 1e3,
                  cpu_percent=100 * cpu[0] / duration,
                  main_cpu_percent=100 * cpu[1] / duration, errors=errors)


def table(results: list[Result], as_json: bool = False) -> None:
    from rich.table import Table

    view = Table(title="Health checks: fedkube (SQLite store) vs OpenFL 1.6 (in memory)")
    for column in ("director", "envoys", "period s", "calls/s", "registrations/s",
                   "µs CPU / registration (director alone)", "p50 ms", "p99 ms",
                   "director CPU % (director alone)", "errors"):
        view.add_column(column, justify="right")
    for r in results:
        view.add_row(r.director, str(r.envoys), f"{r.period_s:g}", f"{r.calls_per_s:.0f}",
                     f"{r.registration_per_s:.0f}",
                     f"{r.registration_cpu_us:.0f} ({r.registration_main_cpu_us:.0f})",
                     f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
                     f"{r.cpu_percent:.0f} ({r.main_cpu_percent:.0f})", str(r.errors))
    console(as_json, width=160).print(view)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envoys", default="5000", help="comma-separated envoy counts")
    parser.add_argument("--period", default="2", help="comma-separated periods, s")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--directors", default="fedkube,openfl,grpc-floor",
                        help="any of fedkube, fedkube+N (with N frontends), openfl and "
                        "grpc-floor (an empty grpc.aio server: the framework's ceiling)")
    parser.add_argument("--openfl-python", type=Path, default=Path(os.environ.get(
        "FEDKUBE_OPENFL_PYTHON", DEFAULT_OPENFL_PYTHON)))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--clients", type=int, default=1, help="load-client processes "
                        "(1: one asyncio client in this process)")
    parser.add_argument("--connections", type=int, default=CONNECTIONS,
                        help="client connections in all (a director's frontends share its "
                        "connections, not its calls)")
    parser.add_argument("--serve-floor", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client-of", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--share", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor(args.serve_floor)
        return
    if args.client_of:
        share, clients = (int(v) for v in args.share.split("/"))
        client_process(args.client_of, share, clients, int(args.envoys), float(args.period),
                       args.connections)
        return
    results = [
        measure(kind, envoys=int(n), period=float(p), duration=args.duration,
                warmup=args.warmup, openfl_python=args.openfl_python, clients=args.clients,
                connections=args.connections)
        for n in args.envoys.split(",") for p in args.period.split(",")
        for kind in args.directors.split(",")
    ]
    table(results, args.json)
    if args.json:
        emit("health_checks", [asdict(r) for r in results])
    else:
        table(results)


if __name__ == "__main__":
    main()
