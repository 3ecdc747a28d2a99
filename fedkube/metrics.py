"""The director's and aggregators' Prometheus counters and histograms, updated where the
work happens (rounds, results, transfers). Served by `fedkube director start
--metrics-port P` together with the state gauges of fedkube.director.metrics."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ROUND_SECONDS = Histogram(
    "fedkube_round_duration_seconds", "Wall time of a closed round, first task to close",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
AGGREGATION_SECONDS = Histogram(
    "fedkube_aggregation_seconds", "Time to check one result and add it to the FedAvg sum",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
BYTES_RECEIVED = Counter("fedkube_bytes_received_total",
                         "Payload bytes received, by RPC", ["rpc"])
BYTES_SENT = Counter("fedkube_bytes_sent_total", "Payload bytes sent, by RPC", ["rpc"])
RESULTS = Counter("fedkube_task_results_total",
                  "Task results taken into an experiment, by task", ["task"])
REPEATED_RESULTS = Counter("fedkube_repeated_task_results_total",
                           "Task results sent again after being taken (a retried upload "
                           "whose reply was lost), acknowledged and ignored")
DROPOUTS = Counter("fedkube_collaborator_dropouts_total",
                   "Collaborators left out of a round that closed on quorum")
HEALTH_CHECKS = Counter("fedkube_health_checks_total", "UpdateEnvoyStatus calls served")
FRONTEND_HEALTH_CHECKS = Counter("fedkube_frontend_health_checks_total",
                                 "UpdateEnvoyStatus calls served by the director's frontends "
                                 "(also counted in fedkube_health_checks_total)")
FRONTEND_REGISTRATIONS = Counter("fedkube_frontend_registrations_total",
                                 "Shard registrations handed over by the director's frontends")
FRONTEND_REGISTRATION_BATCHES = Counter("fedkube_frontend_registration_batches_total",
                                        "Calls that handed them over (many per call)")
FRONTEND_RESTARTS = Counter("fedkube_frontend_restarts_total",
                            "Director frontends started again after they exited")
