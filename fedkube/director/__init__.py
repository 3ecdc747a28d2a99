"""The director: registry of shards and envoys, experiments, and their gRPC service."""
