"""The envoys' OpenFL shard descriptor: a disjoint part of the digits per envoy.

envoy_config.yaml:
    shard_descriptor:
      template: shard_descriptor.DigitsShardDescriptor
      params:
        rank_worldsize: "1,2"
"""

from __future__ import annotations

import digits_data
import numpy as np
from openfl.interface.interactive_api.shard_descriptor import ShardDataset, ShardDescriptor


class DigitsShardDataset(ShardDataset):
    """(image 8x8 float32, label int64) pairs."""

    def __init__(self, images: digits_data.Images, labels: digits_data.Labels) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[digits_data.Images, np.int64]:
        return self.images[index], self.labels[index]


class DigitsShardDescriptor(ShardDescriptor):
    """Shard rank of worldsize ("rank,worldsize", ranks from 1): its train and val sets."""

    def __init__(self, rank_worldsize: str = "1,1") -> None:
        rank, worldsize = (int(part) for part in str(rank_worldsize).split(","))
        self.rank, self.worldsize = rank, worldsize
        self.splits = {name: DigitsShardDataset(*split)
                       for name, split in digits_data.shard_split(rank, worldsize).items()}

    def get_dataset(self, dataset_type: str = "train") -> DigitsShardDataset:
        if dataset_type not in self.splits:
            raise ValueError(f"no {dataset_type!r} dataset: only {sorted(self.splits)}")
        return self.splits[dataset_type]

    @property
    def sample_shape(self) -> list[str]:
        return list(digits_data.SAMPLE_SHAPE)

    @property
    def target_shape(self) -> list[str]:
        return list(digits_data.TARGET_SHAPE)

    @property
    def dataset_description(self) -> str:
        sizes = ", ".join(f"{len(split)} {name}" for name, split in self.splits.items())
        return (f"8x8 digits, shard {self.rank} of {self.worldsize} ({sizes}; "
                f"{digits_data.TEST_SIZE} held out)")
