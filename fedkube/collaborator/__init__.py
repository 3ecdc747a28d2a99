"""The collaborator: runs an experiment's train/validate tasks on one shard."""
