"""Kubernetes credentials for the operator and the envoy: in-cluster when running in a
pod, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""

from __future__ import annotations

from kubernetes import client, config

# Concurrent API calls (the operator's 16 poll threads, kopf's handler threads) each keep
# a connection; urllib3's default pool of 10 made the rest open a new TLS connection per
# call and throw it away.
CONNECTION_POOL_SIZE = 32


def load_api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = CONNECTION_POOL_SIZE
    return client.ApiClient(configuration)
