"""Per-experiment aggregation: rounds, streaming FedAvg, best/last models, metrics."""
