"""Operator at scale on the KWOK cluster: N GPU nodes, then N Experiments created at once
(16 concurrent API clients);
time until every one is `Accepted` (submitted to the director), and the operator's CPU
and peak RSS meanwhile. The director and two envoys run as local processes.

    python -m benchmarks.operator_scale --nodes 200 --experiments 200 [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedkube.client import DirectorClient
from fedkube.devcluster import REPO, ControlPlane, FakeNode
from fedkube.local import Process, director_process, envoy_process, free_port, wait_for

NAMESPACE = "scale"
SHARDS = ("shard-0", "shard-1")


def _proc(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS KiB) of a process."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
               .splitlines() if line.startswith("VmHWM:"))
    return cpu, hwm


def _experiments(count: int) -> list[dict[str, Any]]:
    return [{"apiVersion": "fedkube.io/v1alpha1", "kind": "Experiment",
             "metadata": {"name": f"exp-{i:04d}", "namespace": NAMESPACE},
             "spec": {"federation": "digits", "task": "digits-logreg", "rounds": 1,
                      "shards": list(SHARDS)}} for i in range(count)]


def _create_all(plane: ControlPlane, bodies: list[dict[str, Any]]) -> None:
    """Creates the Experiments at once: 16 concurrent clients, as many users would."""
    from concurrent.futures import ThreadPoolExecutor

    from kubernetes import client, config

    api = client.CustomObjectsApi(config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(plane.kubeconfig)))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda body: api.create_namespaced_custom_object(
            "fedkube.io", "v1alpha1", NAMESPACE, "experiments", body), bodies))


def _accepted(plane: ControlPlane) -> int:
    items = json.loads(plane.kubectl("-n", NAMESPACE, "get", "experiments", "-o",
                                     "json").stdout)["items"]
    return sum(any(c["type"] == "Accepted" and c["status"] == "True"
                   for c in item.get("status", {}).get("conditions", [])) for item in items)


def run(nodes: int, experiments: int, work: Path) -> dict[str, float]:
    plane = ControlPlane(work / "k8s", nodes=tuple(FakeNode(f"gpu-{i:04d}", gpus=8)
                                                   for i in range(nodes)))
    processes: list[Process] = []
    try:
        plane.start(timeout=300)
        plane.kubectl("apply", "-f", str(REPO / "crds"))
        plane.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        plane.kubectl("create", "namespace", NAMESPACE)
        port = free_port()
        processes.append(director_process(work, port, period=2.0).start())
        for index, shard in enumerate(SHARDS):
            processes.append(envoy_process(work, shard, port, index=index, count=2).start())
        operator = Process("operator", ["--log-level", "warning", "operator", "run",
                                        "--namespace", NAMESPACE], work / "logs" / "operator.log",
                           env={"KUBECONFIG": str(plane.kubeconfig)}).start()
        processes.append(operator)
        federation = {"apiVersion": "fedkube.io/v1alpha1", "kind": "Federation",
                      "metadata": {"name": "digits", "namespace": NAMESPACE},
                      "spec": {"sampleShape": ["8", "8"], "targetShape": ["1"],
                               "tls": "insecure", "directorEndpoint": f"localhost:{port}"}}
        shards = [{"apiVersion": "fedkube.io/v1alpha1", "kind": "Shard",
                   "metadata": {"name": name, "namespace": NAMESPACE},
                   "spec": {"federation": "digits", "nodeName": f"gpu-{i:04d}",
                            "options": {"index": str(i), "count": "2"}}}
                  for i, name in enumerate(SHARDS)]
        plane.apply([federation, *shards])
        wait_for(lambda: plane.kubectl("-n", NAMESPACE, "get", "daemonset", "digits-envoy",
                                       check=False).returncode == 0,
                 timeout=120, message="federation reconciled")
        def envoys_ready() -> bool:
            daemonset = json.loads(plane.kubectl("-n", NAMESPACE, "get", "daemonset",
                                                 "digits-envoy", "-o", "json").stdout)
            return bool(daemonset.get("status", {}).get("numberReady") == nodes)

        wait_for(envoys_ready, timeout=300, interval=1,
                 message=f"envoy pods ready on all {nodes} GPU nodes")
        wait_for(lambda: all(p.running for p in processes), timeout=1,
                 message="director, envoys and operator running")
        with DirectorClient(f"localhost:{port}", client_id="bench") as director:
            wait_for(lambda: sum(e.online for e in director.envoys()) == len(SHARDS),
                     timeout=60, message="both shards registered")
        assert operator.popen is not None and processes[0].popen is not None
        pid, director_pid = operator.popen.pid, processes[0].popen.pid
        cpu_before, _ = _proc(pid)
        director_before, _ = _proc(director_pid)
        start = time.perf_counter()
        _create_all(plane, _experiments(experiments))
        applied = time.perf_counter() - start
        try:
            wait_for(lambda: _accepted(plane) == experiments, timeout=600, interval=0.5,
                     message=f"{experiments} experiments Accepted")
        except TimeoutError:
            print(f"{_accepted(plane)} of {experiments} Accepted; operator log tail:\n"
                  f"{operator.output()[-3000:]}")
            raise
        elapsed = time.perf_counter() - start
        cpu_after, peak_kib = _proc(pid)
        director_after, _ = _proc(director_pid)
        envoy_pods = len(json.loads(plane.kubectl(
            "-n", NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=envoy",
            "-o", "json").stdout)["items"])
        return {"nodes": nodes, "experiments": experiments, "envoy_pods": envoy_pods,
                "apply_s": round(applied, 2), "all_accepted_s": round(elapsed, 2),
                "operator_cpu_percent": round(100 * (cpu_after - cpu_before) / elapsed, 1),
                "operator_peak_rss_mib": round(peak_kib / 1024, 1),
                "director_cpu_percent": round(100 * (director_after - director_before)
                                              / elapsed, 1)}
    finally:
        for process in processes:
            process.stop()
        plane.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--experiments", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedkube-scale-") as tmp:
        result = run(args.nodes, args.experiments, Path(tmp))
    view = Table(title="Operator at scale (KWOK)")
    for key in result:
        view.add_column(key, justify="right")
    view.add_row(*(str(v) for v in result.values()))
    Console().print(view)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
