"""Operator at scale on the KWOK cluster: N GPU nodes, a Shard on each, and N
Experiments (one per shard) created at once with the Shards (16 concurrent API clients);
time until every Experiment is `Accepted` (submitted to the director) and every Shard
`Online`, and the operator's CPU and peak RSS meanwhile.

The director runs as a local process; the N envoys are simulated by one asyncio client
speaking the envoy wire protocol (registration, then a health check every period), since
KWOK nodes run no containers. The envoy DaemonSet still puts a Pod on every node.

    python -m benchmarks.operator_scale --nodes 1000 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from benchmarks.report import console, emit
from fedkube.dev.cluster import REPO, ControlPlane, FakeNode
from fedkube.dev.processes import Process, director_process, free_port, wait_for

NAMESPACE = "scale"
HEALTH_PERIOD_S = 10.0


def shard_name(i: int) -> str:
    return f"shard-{i:04d}"


def _proc(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS KiB) of a process."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
               .splitlines() if line.startswith("VmHWM:"))
    return cpu, hwm


def _shards(count: int) -> list[dict[str, Any]]:
    return [{"apiVersion": "fedkube.io/v1alpha1", "kind": "Shard",
             "metadata": {"name": shard_name(i), "namespace": NAMESPACE},
             "spec": {"federation": "digits", "nodeName": f"gpu-{i:04d}",
                      "options": {"index": str(i), "count": str(count)}}}
            for i in range(count)]


def _experiments(count: int) -> list[dict[str, Any]]:
    return [{"apiVersion": "fedkube.io/v1alpha1", "kind": "Experiment",
             "metadata": {"name": f"exp-{i:04d}", "namespace": NAMESPACE},
             "spec": {"federation": "digits", "task": "digits-logreg", "rounds": 1,
                      "shards": [shard_name(i)]}} for i in range(count)]


def _create_all(plane: ControlPlane, bodies: list[dict[str, Any]]) -> None:
    """Creates the resources at once: 16 concurrent clients, as many users would."""
    from concurrent.futures import ThreadPoolExecutor

    from kubernetes import client, config

    api = client.CustomObjectsApi(config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(plane.kubeconfig)))
    plural = {"Shard": "shards", "Experiment": "experiments"}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda body: api.create_namespaced_custom_object(
            "fedkube.io", "v1alpha1", NAMESPACE, plural[body["kind"]], body), bodies))


def _count(plane: ControlPlane, plural: str, condition: str) -> int:
    items = json.loads(plane.kubectl("-n", NAMESPACE, "get", plural, "-o",
                                     "json").stdout)["items"]
    return sum(any(c["type"] == condition and c["status"] == "True"
                   for c in item.get("status", {}).get("conditions", [])) for item in items)


class SimulatedEnvoys:
    """N envoys in one thread: each registers its shard, then checks in every period
    with a random phase, as `fedkube envoy start` does."""

    def __init__(self, port: int, names: list[str]) -> None:
        import threading

        self.port, self.names = port, names
        self.registered = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SimulatedEnvoys:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        import asyncio

        asyncio.run(self._envoys())

    async def _envoys(self) -> None:
        import asyncio
        import random

        import grpc

        from benchmarks.health_checks import shard
        from fedkube.proto import director_pb2, director_pb2_grpc

        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        stub = director_pb2_grpc.DirectorStub(channel)
        limit = asyncio.Semaphore(256)

        async def register(i: int, name: str) -> None:
            request = shard(i)
            request.shard_info.node_info.name = name
            async with limit:
                response = await stub.UpdateShardInfo(request, timeout=60)
                assert response.accepted

        await asyncio.gather(*(register(i, n) for i, n in enumerate(self.names)))
        self.registered.set()

        async def check_in(name: str) -> None:
            request = director_pb2.UpdateEnvoyStatusRequest(name=name)
            await asyncio.sleep(random.uniform(0, HEALTH_PERIOD_S))
            while not self._stop.is_set():
                await stub.UpdateEnvoyStatus(request, timeout=30)
                await asyncio.sleep(HEALTH_PERIOD_S)

        tasks = [asyncio.create_task(check_in(name)) for name in self.names]
        await asyncio.to_thread(self._stop.wait)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await channel.close(None)


def run(nodes: int, work: Path) -> dict[str, float]:
    plane = ControlPlane(work / "k8s", nodes=tuple(FakeNode(f"gpu-{i:04d}", gpus=8)
                                                   for i in range(nodes)))
    processes: list[Process] = []
    try:
        plane.start(timeout=600)
        plane.kubectl("apply", "-f", str(REPO / "crds"))
        plane.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        plane.kubectl("create", "namespace", NAMESPACE)
        port = free_port()
        director = director_process(work, port, period=HEALTH_PERIOD_S).start()
        processes.append(director)
        operator = Process("operator", ["--log-level", "info", "operator", "run",
                                        "--namespace", NAMESPACE], work / "logs" / "operator.log",
                           env={"KUBECONFIG": str(plane.kubeconfig)}).start()
        processes.append(operator)
        federation = {"apiVersion": "fedkube.io/v1alpha1", "kind": "Federation",
                      "metadata": {"name": "digits", "namespace": NAMESPACE},
                      "spec": {"sampleShape": ["8", "8"], "targetShape": ["1"],
                               "tls": "insecure", "directorEndpoint": f"localhost:{port}",
                               "healthCheckPeriodSeconds": int(HEALTH_PERIOD_S)}}
        plane.apply([federation])
        wait_for(lambda: plane.kubectl("-n", NAMESPACE, "get", "daemonset", "digits-envoy",
                                       check=False).returncode == 0,
                 timeout=120, message="federation reconciled")
        with SimulatedEnvoys(port, [shard_name(i) for i in range(nodes)]) as envoys:
            if not envoys.registered.wait(timeout=300):
                raise TimeoutError(f"{nodes} simulated envoys registered")
            wait_for(lambda: operator.running and director.running, timeout=1,
                     message="director and operator running")
            assert operator.popen is not None and director.popen is not None
            pid, director_pid = operator.popen.pid, director.popen.pid
            cpu_before, _ = _proc(pid)
            director_before, _ = _proc(director_pid)
            start = time.perf_counter()
            _create_all(plane, [*_shards(nodes), *_experiments(nodes)])
            applied = time.perf_counter() - start
            try:
                wait_for(lambda: _count(plane, "experiments", "Accepted") == nodes,
                         timeout=900, interval=1, message=f"{nodes} experiments Accepted")
            except TimeoutError:
                print(f"{_count(plane, 'experiments', 'Accepted')} of {nodes} Accepted; "
                      f"operator log tail:\n{operator.output()[-3000:]}", file=sys.stderr)
                raise
            accepted = time.perf_counter() - start
            print(f"all {nodes} Accepted after {accepted:.1f} s", file=sys.stderr)
            try:
                wait_for(lambda: _count(plane, "shards", "Online") == nodes, timeout=300,
                         interval=1, message=f"{nodes} shards Online")
            except TimeoutError:
                print(f"{_count(plane, 'shards', 'Online')} of {nodes} Online", file=sys.stderr)
                raise
            online = time.perf_counter() - start
            cpu_after, peak_kib = _proc(pid)
            director_after, _ = _proc(director_pid)
        envoy_pods = len(json.loads(plane.kubectl(
            "-n", NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=envoy",
            "-o", "json").stdout)["items"])
        return {"nodes": nodes, "shards": nodes, "experiments": nodes,
                "envoy_pods": envoy_pods, "create_s": round(applied, 2),
                "all_accepted_s": round(accepted, 2), "all_online_s": round(online, 2),
                "operator_cpu_percent": round(100 * (cpu_after - cpu_before) / online, 1),
                "operator_peak_rss_mib": round(peak_kib / 1024, 1),
                "director_cpu_percent": round(100 * (director_after - director_before)
                                              / online, 1)}
    finally:
        for process in processes:
            process.stop()
        plane.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=200,
                        help="GPU nodes; as many Shards and Experiments")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--work", type=Path, help="keep logs and state here (default: a "
                        "temporary directory, removed)")
    args = parser.parse_args()
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        result = run(args.nodes, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="fedkube-scale-") as tmp:
            result = run(args.nodes, Path(tmp))
    view = Table(title="Operator at scale (KWOK)")
    view.add_column("figure")
    view.add_column("value", justify="right")
    for key, value in result.items():
        view.add_row(key, str(value))
    console(args.json).print(view)
    if args.json:
        emit("operator_scale", result)


if __name__ == "__main__":
    main()
