"""The kopf operator: thin handlers (`handlers.py`) over pure functions that build
manifests (`manifests.py`) and statuses (`conditions.py`, `experiments.py`, `shards.py`)."""
