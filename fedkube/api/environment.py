"""Environment variables by which one fedkube process tells another a fact."""

from __future__ import annotations

# The envoy's PID, set for a local collaborator: it dies with that process
# (fedkube.collaborator.lifetime), set by fedkube.envoy_agent.process_runtime.
ENVOY_PID = "FEDKUBE_ENVOY_PID"
