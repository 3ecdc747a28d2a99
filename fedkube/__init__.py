"""fedkube: federated learning on Kubernetes, speaking OpenFL 1.6's director protocol."""

__version__ = "0.1.0"
