"""The operator's few calls to the Kubernetes API: server-side apply, reads, Secrets.

One `Kube` per operator, made at startup into the operator's state (fedkube.operator.state)
and closed at its cleanup."""

from __future__ import annotations

import base64
import functools
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from fedkube.api.resources import GROUP, VERSION
from fedkube.kube.config import load_api_client

FIELD_MANAGER = "fedkube-operator"


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        """On `api_client`, or one from the kubeconfig or the Pod's service account."""
        self.api_client = api_client if api_client is not None else load_api_client()

    @functools.cached_property
    def dynamic(self) -> DynamicClient:
        # Made on first use: making it asks the apiserver for its resources.
        return DynamicClient(self.api_client)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.api_client.close()  # type: ignore[no-untyped-call]

    def apply(self, manifest: dict[str, Any]) -> None:
        """Server-side apply: creates or updates, owning only the fields we set."""
        resource = self.dynamic.resources.get(api_version=manifest["apiVersion"],
                                              kind=manifest["kind"])
        self.dynamic.server_side_apply(  # type: ignore[no-untyped-call]
            resource, body=manifest, name=manifest["metadata"]["name"],
            namespace=manifest["metadata"].get("namespace"), field_manager=FIELD_MANAGER,
            force_conflicts=True)

    def get_custom(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found = client.CustomObjectsApi(self.api_client).get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name)
            return dict(found)  # type: ignore[call-overload,no-any-return]
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list_custom(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        listing = client.CustomObjectsApi(self.api_client).list_namespaced_custom_object(
            GROUP, VERSION, namespace, plural)
        return list(listing.get("items", []))  # type: ignore[attr-defined]

    def patch_status(self, plural: str, namespace: str, name: str,
                     changes: dict[str, Any]) -> None:
        """A merge patch of some status fields of one of our resources."""
        client.CustomObjectsApi(self.api_client).patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, plural, name, {"status": changes})

    def read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Deployment as the API gives it (camelCase keys), or None."""
        try:
            found = client.AppsV1Api(self.api_client).read_namespaced_deployment(
                name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(self.api_client.sanitize_for_serialization(  # type: ignore[no-untyped-call]
            found))

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        """The Pods with all of these labels, as the API gives them."""
        listing = client.CoreV1Api(self.api_client).list_namespaced_pod(
            namespace, label_selector=",".join(f"{k}={v}" for k, v in selector.items()))
        return list(self.api_client.sanitize_for_serialization(  # type: ignore[no-untyped-call]
            listing).get("items", []))

    def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        try:
            secret = client.CoreV1Api(self.api_client).read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {key: base64.b64decode(value) for key, value in (secret.data or {}).items()}

    def create_if_absent(self, manifest: dict[str, Any]) -> bool:
        """Creates a Secret unless one of that name exists (certificates are issued once)."""
        try:
            client.CoreV1Api(self.api_client).create_namespaced_secret(
                manifest["metadata"]["namespace"], manifest)  # type: ignore[arg-type]
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

    def decide_certificate_request(self, name: str, *, approved: bool, reason: str,
                                   message: str, certificate_pem: bytes | None = None
                                   ) -> None:
        """Approves (and then signs) or denies a CertificateSigningRequest: the approval and
        the certificate are two subresources, written in that order."""
        api = client.CertificatesV1Api(self.api_client)
        current = api.read_certificate_signing_request(name)
        body = self.api_client.sanitize_for_serialization(  # type: ignore[no-untyped-call]
            current)
        condition = {"type": "Approved" if approved else "Denied", "status": "True",
                     "reason": reason, "message": message}
        body.setdefault("status", {})["conditions"] = [
            *body.get("status", {}).get("conditions", []), condition]
        updated = api.replace_certificate_signing_request_approval(name, body)
        if approved and certificate_pem is not None:
            body = self.api_client.sanitize_for_serialization(  # type: ignore[no-untyped-call]
                updated)
            body["status"]["certificate"] = base64.b64encode(certificate_pem).decode()
            api.replace_certificate_signing_request_status(name, body)
