"""scikit-learn's bundled digits (8x8 images, 10 classes), split into shards.

The split is deterministic: a fixed held-out test set shared by everyone (for the demo's
comparison with a centralized baseline), and the rest cut into `count` shards, each with
its own train/val parts. `non_iid=True` sorts by label before cutting, so shards see
skewed label mixes.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

from fedkube.tasks.shard import Arrays, ShardDescriptor, Split

SEED = 1234
TEST_FRACTION = 0.2
VAL_FRACTION = 0.15


@cache
def _digits() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    return images, data.target.astype(np.int64)


def _permutation(n: int) -> npt.NDArray[np.int64]:
    return np.random.default_rng(SEED).permutation(n)


def test_set() -> Arrays:
    """The held-out images no shard holds."""
    images, labels = _digits()
    order = _permutation(len(labels))
    test = order[: int(len(order) * TEST_FRACTION)]
    return images[test], labels[test]


def pool() -> Arrays:
    """Everything but the test set: the union of all shards."""
    images, labels = _digits()
    order = _permutation(len(labels))
    rest = order[int(len(order) * TEST_FRACTION):]
    return images[rest], labels[rest]


class DigitsShard(ShardDescriptor):
    def __init__(self, index: int | str = 0, count: int | str = 1, non_iid: bool | str = False,
                 **unknown: Any) -> None:
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}")
        self.index, self.count = int(index), int(count)
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"need 0 <= index < count, got index={index} count={count}")
        self.non_iid = str(non_iid).lower() in ("1", "true", "yes")
        images, labels = pool()
        order = np.argsort(labels, kind="stable") if self.non_iid else np.arange(len(labels))
        mine = np.array_split(order, self.count)[self.index]
        rng = np.random.default_rng(SEED + self.index)
        mine = rng.permutation(mine)
        n_val = max(1, int(len(mine) * VAL_FRACTION))
        self._val = images[mine[:n_val]], labels[mine[:n_val]]
        self._train = images[mine[n_val:]], labels[mine[n_val:]]

    @property
    def dataset_description(self) -> str:
        kind = "non-IID" if self.non_iid else "IID"
        return (f"scikit-learn digits, shard {self.index + 1} of {self.count} ({kind}): "
                f"{len(self._train[1])} train / {len(self._val[1])} val images of 8x8")

    @property
    def sample_shape(self) -> list[str]:
        return ["8", "8"]

    @property
    def target_shape(self) -> list[str]:
        return ["1"]

    def get_dataset(self, split: Split) -> Arrays:
        return self._train if split == "train" else self._val
