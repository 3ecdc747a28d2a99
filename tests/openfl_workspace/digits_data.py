"""The 8x8 digits (scikit-learn's copy, no download), split the same way everywhere.

One fixed permutation of the 1797 images: its first TEST_SIZE are a held-out test set that no
shard has; the rest is dealt out to the shards round-robin by rank (1-based, as OpenFL's
`rank_worldsize: "1,2"`), and each shard keeps its last VALID_FRACTION for validation.
Used by the envoys' shard descriptor and by the experiment script, so both see the same split.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

SEED = 1797
TEST_SIZE = 360
VALID_FRACTION = 0.2
SAMPLE_SHAPE = ["8", "8"]
TARGET_SHAPE = ["1"]

Images = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


def load() -> tuple[Images, Labels]:
    """All the images (n, 8, 8), pixel values 0..16, and their labels 0..9, in a fixed order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(SEED).permutation(len(digits.target))
    images = np.asarray(digits.images, dtype=np.float32)[order]
    labels = np.asarray(digits.target, dtype=np.int64)[order]
    return images, labels


def held_out() -> tuple[Images, Labels]:
    """The held-out test set."""
    images, labels = load()
    return images[:TEST_SIZE], labels[:TEST_SIZE]


def shard_split(rank: int, worldsize: int) -> dict[str, tuple[Images, Labels]]:
    """{"train": ..., "val": ...} of shard rank (1..worldsize): disjoint from other shards."""
    if not 1 <= rank <= worldsize:
        raise ValueError(f"rank {rank} not in 1..{worldsize}")
    images, labels = load()
    mine = slice(TEST_SIZE + rank - 1, None, worldsize)
    images, labels = images[mine], labels[mine]
    n_train = len(labels) - round(len(labels) * VALID_FRACTION)
    return {"train": (images[:n_train], labels[:n_train]),
            "val": (images[n_train:], labels[n_train:])}
