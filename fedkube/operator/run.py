"""`fedkube operator run`: the kopf operator, cluster-wide or in some namespaces."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence


def run_operator(namespaces: Sequence[str] = (), *, liveness_port: int | None = None,
                 metrics_port: int | None = None) -> None:
    import kopf

    import fedkube.operator.handlers  # noqa: F401  (registers the handlers)
    from fedkube.operator.metrics import serve_metrics

    if metrics_port is not None:
        serve_metrics(metrics_port)

    liveness = f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None
    # SIGTERM and SIGINT are kopf's own: run in the main thread, kopf.operator adds loop
    # signal handlers that stop it gracefully (kopf._core.reactor.running.spawn_tasks), and
    # it returns, so the command exits 0. No handler of ours, lest the two disagree.
    asyncio.run(kopf.operator(standalone=True, clusterwide=not namespaces,
                              namespaces=list(namespaces), liveness_endpoint=liveness))
