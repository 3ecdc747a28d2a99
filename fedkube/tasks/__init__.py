"""Built-in shard loaders and models (numpy), and the interfaces user code implements."""
