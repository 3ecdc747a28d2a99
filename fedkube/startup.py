"""Process set-up for every `fedkube` command: memory tunables (with the re-exec they
need), logging and the event loop. Imports nothing else of fedkube, so any role may use it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# -- memory -------------------------------------------------------------------------------
# Each model-sized bytes object (a serialized tensor, a reassembled result) is a fresh
# glibc mmap; touching it page by page costs far more than copying into it (on the
# project's VMs, 0.3 s to fault 256 MiB against 0.016 s to copy it). glibc 2.35+ can back
# such mappings with transparent huge pages (`glibc.malloc.hugetlb=1`, honoured where THP
# is `madvise` or `always`), 512x fewer faults. The tunable is read at process start, so
# the long-lived commands that move models re-exec themselves once with it set.

TUNABLE = "glibc.malloc.hugetlb=1"
_DONE_ENV = "FEDKUBE_MALLOC_TUNED"


def tuned_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """env (default: os.environ) with the huge-page tunable added."""
    env = dict(os.environ if env is None else env)
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in current:
        env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    env[_DONE_ENV] = "1"
    return env


def exec_fedkube(python: str | Path, argv: Sequence[str], env: dict[str, str]) -> None:
    """Replaces this process with `python -m fedkube.cli argv` (same output streams)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(python, [str(python), "-m", "fedkube.cli", *argv], env)


def reexec_with_huge_pages(argv: Sequence[str]) -> None:
    """Re-executes `python -m fedkube.cli argv` once with the tunable (Linux only)."""
    if not sys.platform.startswith("linux") or os.environ.get(_DONE_ENV):
        return
    if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    exec_fedkube(sys.executable, argv, tuned_environment())


# -- logging ------------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra=` fields (experiment, round, ...) are kept."""

    _standard = set(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self._standard})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    """rich on a terminal, plain or JSON lines otherwise."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif fmt == "rich" or (fmt == "auto" and sys.stderr.isatty()):
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=True)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    for noisy in ("grpc", "asyncio", "kubernetes", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


# -- event loop ---------------------------------------------------------------------------
# Per gRPC call, most of the director's time is grpc.aio and the event loop; uvloop cut the
# director's CPU per registration by about 10 % (470 -> 424 us, 2,270 -> 2,500/s on the
# 2-core benchmark machine, docs/benchmarks.md). FEDKUBE_EVENT_LOOP=asyncio opts out.

def server_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed, asyncio's own otherwise."""
    if os.environ.get("FEDKUBE_EVENT_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
