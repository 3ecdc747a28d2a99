"""fedkube: federated learning on Kubernetes, wire-compatible with the OpenFL 1.6 director workflow."""

__version__ = "0.1.0"
