"""Events and log lines the operator repeats only when they change.

kopf.event creates a new Event object on each call, and a handler retried every few
seconds for the same reason (a missing Federation, a director that does not answer) made
one each time; `Recent` remembers the last one per object and lets the same again through
only after a window. `QuietKopf` lowers kopf's own per-call lines: a timer's success
(every second per Federation) to DEBUG, and a handler's temporary failure (a wait our
handlers ask for by raising kopf.TemporaryError, with a one-line reason) to INFO, which
also keeps kopf from posting each of those as an Error event."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import grpc

# As the kubelet's event recorder: the same event for the same object within 10 minutes
# is one event.
EVENT_WINDOW_S = 600.0
RECENT_CAPACITY = 10_000


class Recent:
    """The last value seen per key: `fresh` says whether a value is new for its key (or
    its window has passed since it was last let through). Bounded: the oldest keys go."""

    def __init__(self, window_s: float = EVENT_WINDOW_S, capacity: int = RECENT_CAPACITY
                 ) -> None:
        self.window_s, self.capacity = window_s, capacity
        self._seen: OrderedDict[Hashable, tuple[Hashable, float]] = OrderedDict()
        self._lock = threading.Lock()

    def fresh(self, key: Hashable, value: Hashable, *, now: float | None = None) -> bool:
        at = time.monotonic() if now is None else now
        with self._lock:
            last = self._seen.get(key)
            if last is not None and last[0] == value and at - last[1] < self.window_s:
                return False
            self._seen[key] = (value, at)
            self._seen.move_to_end(key)
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
            return True

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._seen.pop(key, None)


def object_key(obj: Any) -> Hashable:
    """An object's uid (or its namespace and name when it has none)."""
    meta = obj.get("metadata", {}) if hasattr(obj, "get") else {}
    return meta.get("uid") or (meta.get("namespace"), meta.get("name"))


def post_event(recent: Recent, obj: Any, *, type: str, reason: str, message: str,
               by_reason: bool = False) -> bool:
    """kopf.event, unless the object's last event had this type, reason and message
    within the window. by_reason: the same type and reason is the same event whatever
    the message (a wait's details vary: gRPC names the address it tried last). Whether
    it posted."""
    same = (type, reason) if by_reason else (type, reason, message)
    if not recent.fresh(("event", object_key(obj)), same):
        return False
    import kopf

    kopf.event(obj, type=type, reason=reason, message=message)
    return True


def rpc_error(exc: BaseException) -> str:
    """A gRPC error on one line, `CODE: details` (str() of one is a multi-line dump)."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        details = exc.details() if hasattr(exc, "details") else ""
        return f"{getattr(code, 'name', code)}: {' '.join(str(details or '').split())}"
    return " ".join(str(exc).split())


_TIMER_SUCCEEDED = re.compile(r"^Timer '[^']*' succeeded\.$")
_TEMPORARY = re.compile(r"^(Handler|Timer) '[^']*' failed temporarily: ")
_QUIETED = "_fedkube_quieted"


class QuietKopf(logging.Filter):
    """On kopf's `kopf.objects` logger: timers' success lines to DEBUG, handlers'
    temporary failures to INFO (those that will be retried; one that gives up stays an
    error). A record lowered below what the root logger shows is dropped here, since
    handlers that records propagate to do not check the logger's level again."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _QUIETED, False):
            return True
        message = record.getMessage()
        level = record.levelno
        if level == logging.INFO and _TIMER_SUCCEEDED.match(message):
            level = logging.DEBUG
        elif level == logging.ERROR and _TEMPORARY.match(message):
            level = logging.INFO
        if level == record.levelno:
            return True
        record.levelno, record.levelname = level, logging.getLevelName(level)
        setattr(record, _QUIETED, True)
        return logging.getLogger().isEnabledFor(level)


def quiet_kopf(logger: logging.Logger | None = None) -> None:
    """Installs QuietKopf on kopf's object logger, once."""
    target = logger or logging.getLogger("kopf.objects")
    if not any(isinstance(f, QuietKopf) for f in target.filters):
        target.addFilter(QuietKopf())
