"""A data owner's answer on Kubernetes: annotations on the shard's own Shard object.

An envoy runs one experiment at a time, so one pair says it: `fedkube.io/approve` or
`fedkube.io/refuse` naming the experiment (its name at the director, as the Experiment's
`Approved` condition and `fedkube shard pending` show it), with `fedkube.io/reason` for
the model owner. Who may set them is who may patch that Shard: a Role with
`resourceNames: [<shard>]` gives each data owner its own shard and no other, which the
annotations of one object (unlike a field of a shared object) allow.
"""

from __future__ import annotations

from typing import Any

APPROVE = "fedkube.io/approve"
REFUSE = "fedkube.io/refuse"
REASON = "fedkube.io/reason"


def answer_in(annotations: dict[str, str], experiment: str) -> tuple[str, str] | None:
    """(decision, reason) the annotations give experiment, or None."""
    reason = annotations.get(REASON, "")
    if annotations.get(REFUSE) == experiment:  # a refusal wins over a stale approval
        return "refused", reason or "refused by the data owner"
    if annotations.get(APPROVE) == experiment:
        return "accepted", reason or "approved by the data owner"
    return None


def read_answer(namespace: str, shard: str, experiment: str) -> tuple[str, str] | None:
    """The answer on experiment in Shard namespace/shard's annotations (blocking)."""
    from kubernetes import client

    from fedkube.api.resources import GROUP, VERSION
    from fedkube.kube.config import load_api_client

    with load_api_client() as api:
        found: Any = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, "shards", shard)
    return answer_in(dict(found.get("metadata", {}).get("annotations") or {}), experiment)
