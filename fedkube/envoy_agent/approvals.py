"""Manual approval on the data owner's side: files in the envoy's work directory.

An experiment that the shard policy leaves to the data owner (`approval: manual`) is posted
as `approvals/<experiment>.pending.json` (who submitted it, its task, rounds and archive
digest); the owner answers with `fedkube shard approve|refuse EXPERIMENT --work-dir D`,
which writes `approvals/<experiment>.answer.json`, and the waiting envoy takes it. The
answer is the data owner's because only the envoy's user (and root) can write its work
directory; the director, the model owner and the experiment's own code cannot.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedkube.api.errors import InvalidArgumentError, NotFoundError

APPROVALS = "approvals"
POLL_S = 0.5  # how often a waiting envoy looks for the answer


@dataclass(frozen=True)
class Answer:
    decision: str  # accepted | refused
    reason: str


def _directory(work_dir: Path) -> Path:
    return work_dir / APPROVALS


def _write(path: Path, data: dict[str, Any]) -> None:
    """Whole or not at all: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(f".{path.name}.part")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(partial, path)


def post(work_dir: Path, experiment: str, summary: dict[str, Any]) -> None:
    """Posts an experiment for the data owner's answer (a stale answer is dropped)."""
    (_directory(work_dir) / f"{experiment}.answer.json").unlink(missing_ok=True)
    _write(_directory(work_dir) / f"{experiment}.pending.json", summary)


def pending(work_dir: Path) -> list[dict[str, Any]]:
    """The experiments waiting for this envoy's data owner, oldest first."""
    posted = sorted(_directory(work_dir).glob("*.pending.json"), key=lambda p: p.stat().st_mtime)
    out = []
    for path in posted:
        try:
            out.append({"experiment": path.name.removesuffix(".pending.json"),
                        **json.loads(path.read_text())})
        except (OSError, ValueError):  # answered (and removed) meanwhile
            continue
    return out


def answer(work_dir: Path, experiment: str, decision: str, reason: str) -> None:
    """The data owner's answer on a posted experiment."""
    if decision not in ("accepted", "refused"):
        raise InvalidArgumentError(f"unknown decision {decision!r}")
    if not (_directory(work_dir) / f"{experiment}.pending.json").exists():
        waiting = ", ".join(p["experiment"] for p in pending(work_dir)) or "none"
        raise NotFoundError(f"no experiment {experiment!r} is waiting for approval in "
                            f"{work_dir} (waiting: {waiting})")
    _write(_directory(work_dir) / f"{experiment}.answer.json",
           asdict(Answer(decision, reason)))


def take(work_dir: Path, experiment: str) -> Answer | None:
    """The answer on an experiment, if there is one; taking it clears the posting."""
    path = _directory(work_dir) / f"{experiment}.answer.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return Answer("refused", f"the data owner's answer is unreadable: {exc}")
    path.unlink(missing_ok=True)
    (_directory(work_dir) / f"{experiment}.pending.json").unlink(missing_ok=True)
    decision = data.get("decision")
    if decision not in ("accepted", "refused"):
        return Answer("refused", f"the data owner's answer is not a decision: {decision!r}")
    return Answer(decision, str(data.get("reason", "")))


async def wait_for_answer(work_dir: Path, experiment: str) -> Answer:
    """Until the data owner answers (however long that takes)."""
    while (found := take(work_dir, experiment)) is None:  # noqa: ASYNC110 - another
        # process writes the answer: a file, not an event of this one
        await asyncio.sleep(POLL_S)
    return found


def withdraw(work_dir: Path, experiment: str) -> None:
    """An experiment no longer waiting (it ended meanwhile)."""
    for suffix in (".pending.json", ".answer.json"):
        (_directory(work_dir) / f"{experiment}{suffix}").unlink(missing_ok=True)
