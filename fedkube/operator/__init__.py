"""The kopf operator: thin handlers (`handlers.py`) over pure functions that build
manifests (`manifests.py`) and statuses (`conditions.py`, `experiments.py`, `shards.py`);
its state (Kubernetes and director clients, worker threads) lives in kopf's `memo`
(`state.py`), made at start-up and closed at clean-up; `signer.py` signs shard CSRs."""
