"""What the operator keeps between handler calls: its Kubernetes client, a director client
per federation, shared listings, the envoy-config renders and the poll threads.

Made by the startup handler into kopf's operator-wide `memo` (`open_state`), which kopf
copies, shallowly, into each object's memo: every handler reaches the same state with
`state_of(memo)`. Closed by the cleanup handler (`close_state`). Nothing of it lives in
module globals, so two operators (or tests) in one process do not share it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import kopf
from kubernetes import client

from fedkube.api.resources import FederationSpec
from fedkube.client import DirectorClient, EnvoyView
from fedkube.operator.coalesce import Coalescer
from fedkube.operator.events import Recent
from fedkube.operator.kube import Kube
from fedkube.operator.manifests import director_endpoint, names
from fedkube.transport.tls import TLSFiles

OPERATOR_IDENTITY = "fedkube-operator"
MEMO_KEY = "state"
# The per-object API calls of one poll run on these threads: one at a time, 1,000 status
# patches to a busy apiserver took minutes.
POLL_WORKERS = 16

FederationIndex = kopf.Index[tuple[str, str], dict[str, Any]]
T = TypeVar("T")


class FederationMissing(Exception):
    pass


class DirectorClients:
    """A client of each federation's director, kept open across polls and replaced when
    the federation's endpoint or TLS mode changes."""

    def __init__(self, kube: Kube) -> None:
        self._kube = kube
        self._clients: dict[tuple[str, str], tuple[tuple[str, str], DirectorClient]] = {}
        self._lock = threading.Lock()

    def get(self, namespace: str, federation: str, index: FederationIndex) -> DirectorClient:
        specs = index.get((namespace, federation))
        spec = next(iter(specs), None) if specs else None
        if spec is None:
            raise FederationMissing(
                f"Federation {federation!r} does not exist in {namespace!r}")
        fed = FederationSpec.model_validate(spec)
        key, wanted = (namespace, federation), (director_endpoint(federation, namespace, fed),
                                                fed.tls)
        # Made under the lock: two handlers racing here must not each make one and close
        # the other's mid-call.
        with self._lock:
            cached = self._clients.get(key)
            if cached is not None and cached[0] == wanted:
                return cached[1]
            tls = None
            if fed.tls == "mtls":
                secret = self._kube.read_secret(namespace, names(federation).operator_tls)
                if secret is None:
                    raise kopf.TemporaryError(
                        f"waiting for the certificates of {federation!r}", delay=5)
                tls = TLSFiles(ca=secret["ca.crt"], cert=secret["tls.crt"],
                               key=secret["tls.key"])
            made = DirectorClient(wanted[0], tls=tls, client_id=OPERATOR_IDENTITY, timeout=10)
            self._clients[key] = (wanted, made)
        if cached is not None:  # the federation's endpoint or TLS mode changed
            cached[1].close()
        return made

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for _, made in clients:
            made.close()


class SharedListing(Generic[T]):
    """A director listing per federation (the shard registry), shared by the Shards' poll
    and every Experiment's submission for up to `ttl` seconds: with N Experiments
    submitted at once, the director answers one listing per federation per `ttl`, not N."""

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        self._entries: dict[tuple[str, str], tuple[float, T]] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: tuple[str, str], fetch: Callable[[], T]) -> T:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one listing in flight per federation; the others wait for it
            cached = self._entries.get(key)
            if cached is not None and time.monotonic() - cached[0] < self.ttl:
                return cached[1]
            value = fetch()
            self._entries[key] = (time.monotonic(), value)
            return value


def _poll_workers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(POLL_WORKERS, thread_name_prefix="fedkube-poll")


@dataclass
class OperatorState:
    kube: Kube
    directors: DirectorClients
    # Renders of each federation's envoy ConfigMap, keyed (namespace, federation).
    envoy_configs: Coalescer = field(default_factory=Coalescer)
    # The director's shard registry of each federation.
    registry: SharedListing[dict[str, EnvoyView]] = field(default_factory=SharedListing)
    poll_workers: ThreadPoolExecutor = field(default_factory=_poll_workers)
    # Per followed experiment, keyed (namespace, federation, name): the director's list
    # entry (state, progress) when its details were last fetched, and when.
    detailed: dict[tuple[str, str, str], tuple[tuple[str, float], float]] = field(
        default_factory=dict)
    # The last Event posted per object and the last poll error logged per federation:
    # the same again is posted or logged only when it changes (fedkube.operator.events).
    recent: Recent = field(default_factory=Recent)

    @classmethod
    def create(cls, api_client: client.ApiClient | None = None) -> OperatorState:
        """On `api_client`, or one from the kubeconfig or the Pod's service account."""
        kube = Kube(api_client)
        return cls(kube=kube, directors=DirectorClients(kube))

    def close(self) -> None:
        """Stops the threads (runs not started yet are dropped) and closes the clients."""
        self.envoy_configs.close()
        self.poll_workers.shutdown(wait=False, cancel_futures=True)
        self.directors.close()
        self.kube.close()


def open_state(memo: kopf.Memo, api_client: client.ApiClient | None = None
               ) -> OperatorState:
    state = OperatorState.create(api_client)
    memo[MEMO_KEY] = state
    return state


def state_of(memo: kopf.Memo) -> OperatorState:
    state = memo.get(MEMO_KEY)
    if not isinstance(state, OperatorState):
        raise RuntimeError("the operator's state is not in the memo: its startup handler "
                           "(fedkube.operator.handlers.configure) has not run")
    return state


def close_state(memo: kopf.Memo) -> None:
    state = memo.pop(MEMO_KEY, None)
    if isinstance(state, OperatorState):
        state.close()
