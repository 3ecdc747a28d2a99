"""One run of a job for any burst of requests to run it, off the requester's thread.

When 1,000 Shards are created at once, each one's handler asks for its federation's envoy
ConfigMap to be rendered again, and each render reads every Shard: a render per request is
quadratic, and handlers that wait for renders hold kopf's few handler threads while the
Experiments behind them wait. Here a request only marks the key dirty and returns; one
worker thread renders each dirty key, and a request made during a render schedules one
more render after it, so no request is left with a render that began before it (which
could miss its Shard). A failed render is retried after a delay.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class Coalescer:
    def __init__(self, *, retry_after: float = 5.0) -> None:
        self.retry_after = retry_after
        self._guard = threading.Lock()
        self._jobs: dict[Hashable, Callable[[], None]] = {}
        self._scheduled: set[Hashable] = set()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="fedkube-render")
        self._closed = False
        self.runs = 0

    def request(self, key: Hashable, job: Callable[[], None]) -> None:
        """Runs job (the latest one given for `key`) soon, on the worker thread."""
        with self._guard:
            if self._closed:
                return
            self._jobs[key] = job
            if key in self._scheduled:
                return  # a run that has not started yet will see this request
            self._scheduled.add(key)
            self._worker.submit(self._run, key)  # under the guard: never after close()

    def _run(self, key: Hashable) -> None:
        with self._guard:
            self._scheduled.discard(key)  # requests from now on get a run of their own
            job = self._jobs[key]
        try:
            job()
            self.runs += 1
        except Exception:
            log.exception("rendering %s failed; retrying in %g s", key, self.retry_after)
            timer = threading.Timer(self.retry_after, self.request, (key, job))
            timer.daemon = True
            timer.start()

    def close(self) -> None:
        """Drops the runs not started yet and ignores later requests (retries included);
        a run under way finishes on its own."""
        with self._guard:
            self._closed = True
        self._worker.shutdown(wait=False, cancel_futures=True)

    def drain(self, timeout: float = 30.0) -> None:
        """Waits until every run requested so far has finished (for tests)."""
        self._worker.submit(lambda: None).result(timeout=timeout)
