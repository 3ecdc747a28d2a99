"""Names derived from other names, within Kubernetes' and the director's limits.

A derived name keeps as much of its readable source as fits and, where it must be cut or
where two sources could map to the same text (`node.1` and `node-1` both read `node-1`),
ends in a hash of the source itself, so distinct sources never share a name.
"""

from __future__ import annotations

import hashlib
import re

HASH_CHARS = 10
DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")


def digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:HASH_CHARS]


def with_digest(readable: str, limit: int, *parts: str) -> str:
    """readable cut to leave room for `-<digest of parts>`, then that suffix."""
    head = readable[: limit - HASH_CHARS - 1].rstrip("-._")
    return f"{head}-{digest(*parts)}" if head else digest(*parts)


def dns_label(*parts: str, prefix: str = "") -> str:
    """A DNS label (<= 63: a Pod's name and hostname) unique to parts."""
    readable = re.sub(r"[^a-z0-9-]+", "-", "-".join((prefix, *parts)).lower()).strip("-")
    return with_digest(readable, 63, *parts)


def label_value(text: str) -> str:
    """text as a label value (<= 63 characters of [A-Za-z0-9._-]); cut with a digest of
    text when it does not fit as it is."""
    if LABEL_VALUE.fullmatch(text) and len(text) <= 63:
        return text
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    return with_digest(readable, 63, text)
