"""The director's event loop: uvloop where installed, asyncio's own otherwise.

Per gRPC call, most of the director's time is grpc.aio and the event loop; uvloop cut the
director's CPU per registration by about 10 % (470 -> 424 us, 2,270 -> 2,500/s on the
2-core benchmark machine, docs/benchmarks.md). FEDKUBE_EVENT_LOOP=asyncio opts out.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


def server_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if os.environ.get("FEDKUBE_EVENT_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
