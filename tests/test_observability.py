"""What users see into: Prometheus metrics of a running director, the metrics plot, JSON
logs. Real processes; the metrics are scraped over HTTP as Prometheus would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedkube.client import DirectorClient
from fedkube.dev.processes import (
    Process,
    director_process,
    envoy_process,
    free_port,
    port_open,
    wait_for,
)
from tests.helpers import SLOW_TASK, current_round, scrape, start_federation, submit, submit_plan


def plot(port: int, experiment: str, out: Path) -> subprocess.CompletedProcess[str]:
    """`fedkube experiment plot` as alice, the owner in these tests."""
    return subprocess.run([sys.executable, "-m", "fedkube.cli", "experiment", "plot",
                           experiment, "--director", f"localhost:{port}", "--client-id",
                           "alice", "--insecure", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_director_metrics_move_and_the_plot_and_json_logs(
        tmp_path: Path, processes: list[Process]) -> None:
    port, metrics_port = free_port(), free_port()
    director = director_process(tmp_path, port, period=1.0,
                                extra=["--metrics-port", str(metrics_port)])
    director.log_format = "json"
    processes.append(director.start())
    for i in range(2):
        processes.append(envoy_process(tmp_path, f"env{i}", port, index=i, count=2).start())
    client = DirectorClient(f"localhost:{port}", client_id="alice", timeout=10)

    def envoys_online() -> float:
        try:
            return scrape(metrics_port).get(("fedkube_envoys", (("online", "true"),)), 0.0)
        except OSError:
            return 0.0

    wait_for(lambda: envoys_online() == 2.0, timeout=60, message="2 envoys online in metrics")
    before = scrape(metrics_port)
    assert before[("fedkube_experiments", (("state", "finished"),))] == 0
    assert before.get(("fedkube_round_duration_seconds_count", ()), 0) == 0

    submit(client, "watched", ["env0", "env1"], rounds=3)
    assert client.wait("watched", timeout=120).status == "finished"
    after = scrape(metrics_port)
    assert after[("fedkube_experiments", (("state", "finished"),))] == 1
    assert after[("fedkube_round_duration_seconds_count", ())] == 3
    # 2 collaborators x 3 training rounds; 2 x 4 validations (3 rounds + the final model)
    assert after[("fedkube_task_results_total", (("task", "train"),))] == 6
    assert after[("fedkube_task_results_total", (("task", "validate"),))] == 8
    assert after[("fedkube_aggregation_seconds_count", ())] == 14
    model_bytes = (64 * 10 + 10) * 4
    # fedkube's collaborators move models over the director's bulk port
    assert after[("fedkube_bytes_received_total", (("rpc", "BulkUpload"),))] \
        >= 6 * model_bytes
    assert after[("fedkube_bytes_sent_total", (("rpc", "BulkDownload"),))] \
        >= 8 * model_bytes
    assert after[("fedkube_health_checks_total", ())] > before[("fedkube_health_checks_total",
                                                                 ())]

    # The plot: a real PNG of a real size, not blank.
    out = tmp_path / "watched.png"
    result = plot(port, "watched", out)
    assert result.returncode == 0, result.stderr
    import matplotlib.image

    pixels = matplotlib.image.imread(str(out))
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 800
    assert float(np.std(pixels[..., :3])) > 0.05  # lines and text, not a blank canvas

    # JSON logs: one object per line, events carry experiment and round fields.
    lines = [json.loads(line) for line in director.output().splitlines()
             if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(e) for e in lines)
    assert any(e.get("experiment") == "watched" and "round" in e for e in lines)
    client.close()


@pytest.mark.slow
def test_unknown_experiment_plot_is_a_clear_error(tmp_path: Path,
                                                  processes: list[Process]) -> None:
    port = free_port()
    processes.append(director_process(tmp_path, port, period=1.0).start())

    def up() -> bool:
        try:
            with DirectorClient(f"localhost:{port}", timeout=2) as client:
                client.envoys()
            return True
        except grpc.RpcError:
            return False

    wait_for(up, timeout=30, message="director up")
    result = subprocess.run([sys.executable, "-m", "fedkube.cli", "experiment", "plot", "nope",
                             "--director", f"localhost:{port}", "--insecure", "--out",
                             str(tmp_path / "x.png")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "no experiment named 'nope'" in result.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_director_exports_the_gpus_its_envoys_report(tmp_path: Path,
                                                     processes: list[Process]) -> None:
    from fedkube.proto import director_pb2, director_pb2_grpc

    port, metrics_port = free_port(), free_port()
    processes.append(director_process(tmp_path, port, period=30.0,
                                      extra=["--metrics-port", str(metrics_port)]).start())

    def gpu(index: int, utilization: str) -> director_pb2.CudaDeviceInfo:
        return director_pb2.CudaDeviceInfo(
            index=index, name="NVIDIA H100 80GB HBM3", memory_total=80 << 30,
            memory_utilized=(index + 1) << 30, device_utilization=utilization)

    # What an envoy on a two-GPU node sends from NVML, here by hand over the wire.
    metadata = (("client_id", "ward-a"),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = director_pb2_grpc.DirectorStub(channel)
        stub.UpdateShardInfo(director_pb2.UpdateShardInfoRequest(
            shard_info=director_pb2.ShardInfo(
                node_info=director_pb2.NodeInfo(name="ward-a",
                                                cuda_devices=[gpu(0, "0%"), gpu(1, "10%")]),
                n_samples=5, sample_shape=["8", "8"], target_shape=["1"])),
            metadata=metadata, timeout=10)
        wait_for(lambda: port_open(metrics_port), timeout=30, message="metrics served")
        labels = (("gpu", "1"), ("model", "NVIDIA H100 80GB HBM3"), ("shard", "ward-a"))
        samples = scrape(metrics_port)
        assert samples[("fedkube_gpu_memory_used_bytes", labels)] == 2 << 30
        assert samples[("fedkube_gpu_memory_total_bytes", labels)] == 80 << 30
        assert samples[("fedkube_gpu_utilization_ratio", labels)] == 0.1
        # Each health check carries fresh figures.
        stub.UpdateEnvoyStatus(director_pb2.UpdateEnvoyStatusRequest(
            name="ward-a", cuda_devices=[gpu(0, "0%"), gpu(1, "95%")]),
            metadata=metadata, timeout=10)
        assert scrape(metrics_port)[("fedkube_gpu_utilization_ratio", labels)] == 0.95


def test_grafana_dashboard_plots_only_series_we_export() -> None:
    import re

    from prometheus_client import REGISTRY

    # registering the director's, the aggregators' and the operator's series
    import fedkube.aggregator.metrics
    import fedkube.director.metrics
    import fedkube.operator.metrics
    import fedkube.transport.metrics  # noqa: F401

    dashboard = json.loads((Path(__file__).parents[1] / "deploy/grafana-dashboard.json")
                           .read_text())
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    exported = {family.name + suffix for family in REGISTRY.collect()
                for suffix in suffixes.get(family.type, [""])}
    exported |= {"fedkube_envoys", "fedkube_experiments", "fedkube_gpu_memory_used_bytes",
                 "fedkube_gpu_memory_total_bytes", "fedkube_gpu_utilization_ratio"}  # scrape-time
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"fedkube_[a-z_]+", target["expr"])}
    assert len(used) >= 10
    assert used <= exported, used - exported


@pytest.mark.slow
def test_plot_of_a_running_experiment_shows_the_rounds_so_far(
        tmp_path: Path, processes: list[Process]) -> None:
    from fedkube.api.plan import Plan
    from fedkube.dev.demo import PARAMS

    port, client, _ = start_federation(tmp_path, processes, 2, delays={0: 0.3, 1: 0.3})
    plan = Plan(task="archive:slow", rounds=50, params=PARAMS, round_timeout_s=60)
    submit_plan(client, "long", plan, ["env0", "env1"], {"slow.py": SLOW_TASK})
    wait_for(lambda: current_round(client, "long") >= 2, timeout=60, message="round 2")
    out = tmp_path / "long.png"
    result = plot(port, "long", out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(b"\x89PNG")
    assert client.status("long").status == "in_progress"  # it did not wait for the end
    client.close()


async def test_metrics_listen_where_the_director_does_and_stop_with_it(tmp_path: Path) -> None:
    """/metrics (shard names, GPUs) bound 0.0.0.0 whatever --host said, and was never
    stopped: a second director in one process could not register its gauges."""
    import socket

    from fedkube.api.config import DirectorConfig, TLSSettings
    from fedkube.director.server import DirectorServer

    for attempt in range(2):  # a second director in this process, once the first stopped
        server = DirectorServer(DirectorConfig(
            host="127.0.0.1", port=0, data_dir=tmp_path / f"director{attempt}",
            metrics_port=0, tls=TLSSettings(insecure=True)))
        await server.start()
        assert server.metrics is not None and server.metrics_port is not None
        port = server.metrics_port
        assert server.metrics.host == "127.0.0.1"
        assert scrape(port)  # it serves
        assert _listeners(port) == ["127.0.0.1"]
        await server.stop(None)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def _listeners(port: int) -> list[str]:
    """The local addresses with a TCP socket listening on port (from /proc/net/tcp)."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.append(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found
