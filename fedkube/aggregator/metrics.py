"""The aggregators' Prometheus counters and histograms, updated where the work happens
(rounds, results). Served by `fedkube director start --metrics-port P` with
the director's own series (fedkube.director.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ROUND_SECONDS = Histogram(
    "fedkube_round_duration_seconds", "Wall time of a closed round, first task to close",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
AGGREGATION_SECONDS = Histogram(
    "fedkube_aggregation_seconds", "Time to check one result and add it to the FedAvg sum",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
RESULTS = Counter("fedkube_task_results_total",
                  "Task results taken into an experiment, by task", ["task"])
REPEATED_RESULTS = Counter("fedkube_repeated_task_results_total",
                           "Task results sent again after being taken (a retried upload "
                           "whose reply was lost), acknowledged and ignored")
DROPOUTS = Counter("fedkube_collaborator_dropouts_total",
                   "Collaborators left out of a round that closed on quorum")
