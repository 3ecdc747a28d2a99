"""Serving a director's Prometheus metrics (`fedkube director start --metrics-port P`).

The aggregators' counters live in fedkube.aggregator.metrics and the director's below;
the gauges of current state (envoys online, experiments by state, the shards' GPUs) are
read from the director at scrape time, so they cost nothing between scrapes.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fedkube.api.experiment import ExperimentState

if TYPE_CHECKING:
    from fedkube.director.core import Director, EnvoyState

HEALTH_CHECKS = Counter("fedkube_health_checks_total", "UpdateEnvoyStatus calls served")
FRONTEND_HEALTH_CHECKS = Counter("fedkube_frontend_health_checks_total",
                                 "UpdateEnvoyStatus calls served by the director's frontends "
                                 "(also counted in fedkube_health_checks_total)")
FRONTEND_REGISTRATIONS = Counter("fedkube_frontend_registrations_total",
                                 "Shard registrations handed over by the director's frontends")
FRONTEND_REGISTRATION_BATCHES = Counter("fedkube_frontend_registration_batches_total",
                                        "Calls that handed them over (many per call)")
FRONTEND_RESTARTS = Counter("fedkube_frontend_restarts_total",
                            "Director frontends started again after they exited")


class DirectorCollector(Collector):
    """Gauges read from the director's state when Prometheus scrapes."""

    def __init__(self, director: Director) -> None:
        self.director = director

    def collect(self) -> Iterator[GaugeMetricFamily]:
        envoys = self.director.get_envoys()
        online = GaugeMetricFamily("fedkube_envoys", "Registered envoys, by whether online",
                                   labels=["online"])
        live = [e for e in envoys if self.director.is_online(e)]
        online.add_metric(["true"], len(live))
        online.add_metric(["false"], len(envoys) - len(live))
        yield online
        yield from _gpu_gauges(live)
        states = Tally(e.status for e in self.director.experiment_records())
        experiments = GaugeMetricFamily("fedkube_experiments", "Experiments, by state",
                                        labels=["state"])
        for state in ExperimentState:
            experiments.add_metric([state.value], states.get(state, 0))
        yield experiments


def _utilization(text: str) -> float | None:
    """NVML's utilization as envoys report it ("37%", the OpenFL field is a string)."""
    try:
        return float(text.strip().removesuffix("%")) / 100
    except ValueError:
        return None


def _gpu_gauges(envoys: list[EnvoyState]) -> Iterator[GaugeMetricFamily]:
    """Each online shard's GPUs as its envoy last reported them (NVML), so a federation's
    GPUs are plotted from one place: the director."""
    labels = ["shard", "gpu", "model"]
    used = GaugeMetricFamily("fedkube_gpu_memory_used_bytes",
                             "GPU memory in use on a shard's node", labels=labels)
    total = GaugeMetricFamily("fedkube_gpu_memory_total_bytes",
                              "GPU memory of a shard's node", labels=labels)
    busy = GaugeMetricFamily("fedkube_gpu_utilization_ratio",
                             "GPU utilization on a shard's node (0-1)", labels=labels)
    for envoy in envoys:
        for device in envoy.shard_info.node_info.cuda_devices:
            values = [envoy.name, str(device.index), device.name]
            used.add_metric(values, device.memory_utilized)
            total.add_metric(values, device.memory_total)
            ratio = _utilization(device.device_utilization)
            if ratio is not None:
                busy.add_metric(values, ratio)
    yield from (used, total, busy)


class MetricsServer:
    """/metrics of one director, on host:port (0: any), until stop()."""

    def __init__(self, director: Director, host: str, port: int) -> None:
        self._collector = DirectorCollector(director)
        REGISTRY.register(self._collector)
        self._server, self._thread = start_http_server(port, addr=host)
        self.host, self.port = host, int(self._server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        REGISTRY.unregister(self._collector)
