"""An envoy's (or collaborator Pod's) certificate for its own shard, requested from the
operator through a Kubernetes CertificateSigningRequest.

The key pair is made here and the private key never leaves this Pod. The request is made
with the Pod's service-account token, which carries the Pod's node; the operator signs only
when that node is the shard's (fedkube.operator.signer).
"""

from __future__ import annotations

import base64
import logging
import secrets
from pathlib import Path
from typing import Any

from fedkube.api.errors import RefusedError
from fedkube.transport import certs
from fedkube.transport.certs import write_pair_files

log = logging.getLogger(__name__)
SIGNER = "fedkube.io/shard"  # the operator signs requests for this signer name only
REQUEST_TIMEOUT_S = 120.0


class CertificateRefused(RefusedError):
    """The operator denied the request (the message says why) or never answered."""


def _decision(status: dict[str, Any]) -> tuple[bytes | None, str | None]:
    """(certificate, None) once signed; (None, why) once denied or failed; else (None, None)."""
    for condition in status.get("conditions") or []:
        if condition.get("type") in ("Denied", "Failed") and condition.get("status") == "True":
            return None, f"{condition.get('reason')}: {condition.get('message')}"
    if status.get("certificate"):
        return base64.b64decode(status["certificate"]), None
    return None, None



def request_certificate(shard: str, role: str, *, cert_path: Path, key_path: Path,
                        timeout: float = REQUEST_TIMEOUT_S, api_client: Any = None,
                        lifetime_s: int | None = None) -> None:
    """Requests CN=shard, OU=role (valid for lifetime_s, or the signer's default), waits
    for the operator's answer and writes the key (mode 0600) and certificate; raises
    CertificateRefused when denied or unanswered. Each file is replaced whole, so no
    reader sees one half written."""
    from kubernetes import client, watch

    from fedkube.kube.config import load_api_client

    api = client.CertificatesV1Api(api_client or load_api_client())
    request_pem, key_pem = certs.make_request(shard, role=role)
    name = f"fedkube-{role}-{shard}-{secrets.token_hex(4)}"[:253]
    api.create_certificate_signing_request({  # type: ignore[arg-type]
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "fedkube",
                                              "fedkube.io/shard": shard}},
        "spec": {"request": base64.b64encode(request_pem).decode(), "signerName": SIGNER,
                 "usages": ["client auth", "digital signature"],
                 **({"expirationSeconds": lifetime_s} if lifetime_s else {})}})
    log.info("certificate request %s filed for %s of shard %s", name, role, shard)
    certificate, refused = None, None
    stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
        api.list_certificate_signing_request, field_selector=f"metadata.name={name}",
        timeout_seconds=max(1, int(timeout)))
    for event in stream:
        status = api.api_client.sanitize_for_serialization(event["object"]).get("status", {})
        certificate, refused = _decision(status)
        if certificate is not None or refused is not None:
            break
    if refused is not None:
        raise CertificateRefused(f"certificate request {name} denied: {refused}")
    if certificate is None:
        raise CertificateRefused(f"certificate request {name} not answered in {timeout:.0f} s: "
                                 "is the fedkube operator running?")
    write_pair_files(cert_path, key_path, certificate, key_pem)
    log.info("certificate for %s of shard %s received", role, shard)
