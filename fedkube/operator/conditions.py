"""metav1.Condition lists, updated purely: a condition's lastTransitionTime moves only
when its status changes."""

from __future__ import annotations

import datetime as dt
from typing import Any

Conditions = list[dict[str, Any]]


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: Conditions, type_: str, status: bool | None, reason: str,
                  message: str = "", *, generation: int = 0, at: str | None = None
                  ) -> Conditions:
    """A copy of conditions with type_ set; status None means Unknown."""
    value = "Unknown" if status is None else str(bool(status))
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value else (at or now())
    entry = {"type": type_, "status": value, "reason": reason, "message": message[:32768],
             "lastTransitionTime": since, "observedGeneration": generation}
    return [entry if c.get("type") == type_ else c for c in conditions] if old else \
        [*conditions, entry]


def get_condition(conditions: Conditions, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: Conditions, type_: str) -> bool:
    condition = get_condition(conditions, type_)
    return bool(condition and condition.get("status") == "True")
