"""Reviewing experiments against policies: what a shard (or a federation) lets run."""
