"""Payload bytes moved, by RPC: counted by the director's and the aggregators' servicers
and served with their other series (`fedkube director start --metrics-port P`)."""

from __future__ import annotations

from prometheus_client import Counter

BYTES_RECEIVED = Counter("fedkube_bytes_received_total",
                         "Payload bytes received, by RPC", ["rpc"])
BYTES_SENT = Counter("fedkube_bytes_sent_total", "Payload bytes sent, by RPC", ["rpc"])
