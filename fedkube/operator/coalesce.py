"""One run of a job for any burst of requests to run it.

When 1,000 Shards are created at once, each one's handler asks for its federation's envoy
ConfigMap to be rendered again, and each render reads every Shard: a render per request is
quadratic. Here a request returns as soon as a render that started after it has finished,
so a burst costs a couple of renders, and no request is answered by a render that began
before it (which could miss its Shard).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable


class Coalescer:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Hashable, threading.Lock] = {}
        self._requested: dict[Hashable, int] = {}
        self._done: dict[Hashable, int] = {}

    def run(self, key: Hashable, job: Callable[[], None]) -> None:
        """Runs job unless a run of it for `key` that started after this call has already
        succeeded; runs for one key never overlap."""
        with self._guard:
            ticket = self._requested[key] = self._requested.get(key, 0) + 1
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                if self._done.get(key, 0) >= ticket:
                    return
                covers = self._requested[key]
            job()
            with self._guard:
                self._done[key] = max(self._done.get(key, 0), covers)
