"""Text in trailing metadata: what an OpenFL message has no field for (an experiment's
error, a shard's refusal) travels there, escaped.

gRPC metadata values are printable ASCII only; an error is often a traceback, with
newlines and whatever characters the failure printed. Values are percent-encoded as
grpc-message is (RFC 3986 `%XX` of UTF-8 bytes, for `%` and anything not printable
ASCII), so every text arrives whole and a reader that does not unescape still sees
readable text. OpenFL's clients ignore these keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote, unquote

# Printable ASCII but `%`, which introduces an escape.
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
# Far below gRPC's 8 KiB default for all headers together; the owner sees the rest in the
# director's log.
MAX_VALUE_CHARS = 2000


def escape(text: str) -> str:
    """text as a metadata value, cut to MAX_VALUE_CHARS without splitting an escape."""
    value = quote(text, safe=_SAFE, errors="strict")
    if len(value) <= MAX_VALUE_CHARS:
        return value
    cut = value[:MAX_VALUE_CHARS]
    tail = cut.rfind("%", len(cut) - 2)
    return cut[:tail] if tail >= 0 else cut


def unescape(value: str | bytes) -> str:
    if isinstance(value, bytes):  # a *-bin key, or a peer that sent raw bytes
        value = value.decode("ascii", "replace")
    return unquote(value, errors="replace")


def text_trailers(items: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of the non-empty texts, escaped."""
    return tuple((key, escape(text)) for key, text in items if text)


def read_text_trailers(metadata: Iterable[tuple[str, str | bytes]] | None,
                       prefix: str) -> dict[str, str]:
    """The texts under keys starting with prefix (the prefix removed), unescaped."""
    return {key.removeprefix(prefix): unescape(value) for key, value in (metadata or ())
            if key.startswith(prefix) and not key.endswith("-bin")}
