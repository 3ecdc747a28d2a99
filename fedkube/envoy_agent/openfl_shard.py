"""A shard served by an OpenFL 1.6 ShardDescriptor class (`--shard openfl:module.Class`,
its params as `--shard-option`s, as `shard_descriptor` in OpenFL's envoy_config.yaml): the
envoy registers what the descriptor says of itself, read in the OpenFL environment, and
its collaborators hand the descriptor to OpenFL's collaborator. It serves OpenFL
experiments only: fedkube tasks read arrays from a fedkube shard loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedkube.openfl.environment import (
    DESCRIPTOR_PREFIX,
    describe_descriptor,
    descriptor_params,
    openfl_python,
)
from fedkube.tasks.shard import Arrays, ShardDescriptor, ShardLoaderError, Split


class OpenFLShard(ShardDescriptor):
    def __init__(self, loader: str, options: dict[str, Any], python: Path | None) -> None:
        self.descriptor = loader.removeprefix(DESCRIPTOR_PREFIX)
        self.options = descriptor_params(options)
        self.python = openfl_python(python)
        self._described = describe_descriptor(self.python, self.descriptor, self.options)

    @property
    def dataset_description(self) -> str:
        return str(self._described["description"])

    @property
    def sample_shape(self) -> list[str]:
        return [str(s) for s in self._described["sample_shape"]]

    @property
    def target_shape(self) -> list[str]:
        return [str(s) for s in self._described["target_shape"]]

    def __len__(self) -> int:
        return int(self._described["samples"])

    def get_dataset(self, split: Split) -> Arrays:
        raise ShardLoaderError(f"shard descriptor {self.descriptor} is OpenFL's: it serves "
                               f"OpenFL experiments only")
