"""Prometheus metrics of the operator (`fedkube operator run --metrics-port P`): how often
each handler reconciles, how long it takes, and how often it fails."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import Counter, Histogram, start_http_server

F = TypeVar("F", bound=Callable[..., Any])

RECONCILES = Counter("fedkube_operator_reconciles_total", "Handler runs, by resource kind "
                     "and handler", ["kind", "handler"])
ERRORS = Counter("fedkube_operator_reconcile_errors_total", "Handler runs that raised, by "
                 "kind, handler and exception", ["kind", "handler", "error"])
SECONDS = Histogram("fedkube_operator_reconcile_seconds", "Handler run time, by kind",
                    ["kind"], buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
EXPERIMENT_PHASES = Counter("fedkube_operator_experiment_transitions_total",
                            "Experiments entering a phase", ["phase"])


def observed(kind: str) -> Callable[[F], F]:
    """Counts and times a (synchronous) kopf handler; kopf still sees its signature."""

    def decorate(handler: F) -> F:
        @functools.wraps(handler)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            RECONCILES.labels(kind, handler.__name__).inc()
            started = time.perf_counter()
            try:
                return handler(*args, **kwargs)
            except Exception as exc:
                ERRORS.labels(kind, handler.__name__, type(exc).__name__).inc()
                raise
            finally:
                SECONDS.labels(kind).observe(time.perf_counter() - started)

        return wrapper  # type: ignore[return-value]

    return decorate


def serve_metrics(port: int, host: str = "0.0.0.0") -> int:
    server, _ = start_http_server(port, addr=host)
    return int(server.server_port)
