"""The operator's director clients: one per federation, shared by racing handlers."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import kopf
import pytest
from kubernetes.client import ApiClient

from fedkube.operator.state import OperatorState, close_state, open_state, state_of


def _state() -> OperatorState:
    """The operator's state on an ApiClient that is never asked anything."""
    return OperatorState.create(ApiClient())


def test_racing_handlers_share_one_client_and_none_is_closed() -> None:
    """Many handlers asking at once for a federation's client must all get the same one;
    a client made and replaced in the race would be closed under another handler's call
    (seen at 200 Experiments: 'Cannot invoke RPC on closed channel')."""
    spec = {"sampleShape": ["8", "8"], "targetShape": ["1"], "tls": "insecure",
            "directorEndpoint": "localhost:1"}
    index: Any = {("race", "fed"): [spec]}
    state = _state()
    start, got = threading.Barrier(16), []

    def ask() -> None:
        start.wait()
        got.append(state.directors.get("race", "fed", index))

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
    assert error.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.DEADLINE_EXCEEDED)
    state.close()


def test_state_lives_in_the_memo_from_startup_to_cleanup() -> None:
    """The startup handler puts the state in kopf's memo, which kopf copies (shallowly)
    into each object's memo; the cleanup handler closes its clients and threads."""
    memo = kopf.Memo()
    with pytest.raises(RuntimeError, match="startup handler"):
        state_of(memo)
    state = open_state(memo, ApiClient())
    per_object = kopf.Memo(memo)  # as kopf makes each object's memo
    assert state_of(per_object) is state
    index: Any = {("ns", "fed"): [{"sampleShape": ["8"], "targetShape": ["1"],
                                   "tls": "insecure", "directorEndpoint": "localhost:1"}]}
    director = state.directors.get("ns", "fed", index)
    close_state(memo)
    with pytest.raises(RuntimeError, match="startup handler"):
        state_of(memo)
    with pytest.raises(ValueError):  # the director client was closed
        director.envoys()
    with pytest.raises(RuntimeError):  # and the poll threads stopped
        state.poll_workers.submit(lambda: None)
    state.envoy_configs.request("fed", lambda: None)  # ignored once closed
    close_state(memo)  # twice, or without a startup: nothing to close
