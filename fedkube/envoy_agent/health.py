"""What an envoy's probes read: a small file in its work directory that the running envoy
rewrites every few seconds.

An envoy serves no port, so its kubelet probes are `fedkube envoy probe` execs reading
this file. Live: the envoy's event loop wrote it within LIVE_WITHIN_S (a wedged or dead
loop is restarted; an unreachable director is not a reason to, the envoy reconnects by
itself). Ready: its shard is registered and the director answered a health check within
READY_PERIODS health-check periods (the Pod's Ready condition then says the shard is
really online).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HEALTH_FILE = "envoy-health.json"
BEAT_S = 5.0
LIVE_WITHIN_S = 60.0
READY_PERIODS = 3


@dataclass(frozen=True)
class Beat:
    at: float  # when the envoy's loop wrote this
    registered: bool
    last_check: float | None  # the director's last answer to a health check
    period: float  # seconds between health checks


def write_beat(work_dir: Path, beat: Beat) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = work_dir / f".{HEALTH_FILE}.tmp"
    tmp.write_text(json.dumps(asdict(beat)))
    os.replace(tmp, work_dir / HEALTH_FILE)


def probe(work_dir: Path, *, ready: bool, now: float | None = None) -> str | None:
    """None if the envoy is live (and, with ready, ready); else why not, in one line."""
    now = time.time() if now is None else now
    try:
        beat = Beat(**json.loads((work_dir / HEALTH_FILE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        return f"no envoy health in {work_dir / HEALTH_FILE}: {exc}"
    if now - beat.at > LIVE_WITHIN_S:
        return f"the envoy's loop last wrote its health {now - beat.at:.0f} s ago"
    if not ready:
        return None
    if not beat.registered:
        return "the shard is not registered with the director yet"
    limit = READY_PERIODS * beat.period
    if beat.last_check is None or now - beat.last_check > limit:
        return f"the director has not answered a health check within {limit:g} s"
    return None
