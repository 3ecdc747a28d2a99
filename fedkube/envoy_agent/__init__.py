"""The envoy: registers its shard, reports health with its GPUs, runs collaborators."""
