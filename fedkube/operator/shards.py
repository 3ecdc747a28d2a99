"""A Shard's status from the director's registry: a pure mapping."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fedkube.client import EnvoyView
from fedkube.operator.conditions import Conditions, set_condition

# lastHealthCheck is written when it moves by this much: with a patch per Shard per poll
# for every health check, 1,000 Shards would cost the apiserver 200 writes a second.
# (Online/offline still flips at the next poll, as a node's Ready does with its Lease.)
HEALTH_STAMP_RESOLUTION_S = 60
STAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # metav1.Time


def build_shard_status(current: dict[str, Any], envoy: EnvoyView | None, *,
                       node: str | None, generation: int,
                       node_taken: str | None = None) -> dict[str, Any]:
    """node_taken: why another Shard holds this one's node (one shard per node)."""
    conditions: Conditions = list(current.get("conditions", []))

    def cond(type_: str, value: bool, reason: str, message: str = "") -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, value, reason, message,
                                   generation=generation)

    if node_taken is not None:
        cond("Registered", False, "NodeTaken", node_taken)
        cond("Online", False, "NodeTaken")
        cond("Ready", False, "NodeTaken", node_taken)
        return {"conditions": conditions, "online": False, "gpus": 0, "node": node,
                "cudaDevices": [], "currentExperiment": None}
    if envoy is None:
        cond("Registered", False, "NotRegistered", "no envoy has registered this shard")
        cond("Online", False, "NotRegistered")
        cond("Ready", False, "NotRegistered", "no envoy has registered this shard")
        return {"conditions": conditions, "online": False, "gpus": 0, "node": node,
                "cudaDevices": [], "currentExperiment": None}
    cond("Registered", True, "Registered", envoy.description)
    if envoy.online:
        cond("Online", True, "HealthChecksArriving")
    else:
        cond("Online", False, "HealthChecksMissing", "no health check within two periods")
    busy = envoy.experiment if envoy.experiment_running else None
    cond("Ready", envoy.online, "Online" if envoy.online else "Offline",
         f"running {busy}" if busy else "")
    devices = [{"index": d["index"], "name": d["name"],
                "memoryTotalMib": int(d["memory_total"]) >> 20,
                "memoryUsedMib": int(d["memory_utilized"]) >> 20,
                "utilizationPercent": max(0, min(100, int(str(d["utilization"]).rstrip("%")
                                                          or 0)))}
               for d in envoy.cuda_devices]
    seen = (dt.datetime.fromtimestamp(envoy.last_health_check, dt.UTC)
            .strftime(STAMP_FORMAT) if envoy.last_health_check else None)
    return {"conditions": conditions, "online": envoy.online, "gpus": len(devices),
            "node": node, "cudaDevices": devices, "lastHealthCheck": seen,
            "currentExperiment": busy}


def status_changes(current: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """The fields of `wanted` to patch: those that differ, except a lastHealthCheck less
    than HEALTH_STAMP_RESOLUTION_S newer than the one shown."""
    changes = {key: value for key, value in wanted.items() if current.get(key) != value}
    shown, seen = current.get("lastHealthCheck"), changes.get("lastHealthCheck")
    if shown and seen:
        moved = (dt.datetime.strptime(seen, STAMP_FORMAT)
                 - dt.datetime.strptime(shown, STAMP_FORMAT))
        if moved.total_seconds() < HEALTH_STAMP_RESOLUTION_S:
            del changes["lastHealthCheck"]
    return changes
