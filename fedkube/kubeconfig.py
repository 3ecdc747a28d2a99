"""Kubernetes credentials for the operator and the envoy: in-cluster when running in a
pod, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""

from __future__ import annotations

from kubernetes import client, config


def load_api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()
