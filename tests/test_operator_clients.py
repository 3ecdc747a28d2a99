"""The operator's director clients: one per federation, shared by racing handlers."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest

from fedkube.operator import handlers


def test_racing_handlers_share_one_client_and_none_is_closed() -> None:
    """Many handlers asking at once for a federation's client must all get the same one;
    a client made and replaced in the race would be closed under another handler's call
    (seen at 200 Experiments: 'Cannot invoke RPC on closed channel')."""
    spec = {"sampleShape": ["8", "8"], "targetShape": ["1"], "tls": "insecure",
            "directorEndpoint": "localhost:1"}
    index: Any = {("race", "fed"): [spec]}
    handlers._clients.pop(("race", "fed"), None)
    start, got = threading.Barrier(16), []

    def ask() -> None:
        start.wait()
        got.append(handlers.director_for("race", "fed", index))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(client) for client in got}) == 1
    # Still open: a call reaches the transport (nothing listens there) instead of raising
    # ValueError for a closed channel.
    with pytest.raises(grpc.RpcError) as error:
        got[0].envoys()
    assert error.value.code() in (grpc.StatusCode.UNAVAILABLE,  # type: ignore[attr-defined]
                                  grpc.StatusCode.DEADLINE_EXCEEDED)
    handlers._clients.pop(("race", "fed"))[1].close()
