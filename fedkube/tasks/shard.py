"""The shard-loader interface: what an envoy knows of the data it guards.

A loader is named in the envoy's config by a built-in name (`digits`) or an import path
(`package.module:ClassName`); its options are passed as keyword arguments.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedkube.api.errors import FedkubeError

Split = Literal["train", "val"]
Arrays = tuple[npt.NDArray[Any], npt.NDArray[Any]]

BUILTIN_LOADERS = {"digits": "fedkube.tasks.digits:DigitsShard"}


class ShardDescriptor(ABC):
    """A data shard: its description and shapes (sent to the director) and its data."""

    @property
    @abstractmethod
    def dataset_description(self) -> str: ...

    @property
    @abstractmethod
    def sample_shape(self) -> list[str]: ...

    @property
    @abstractmethod
    def target_shape(self) -> list[str]: ...

    @abstractmethod
    def get_dataset(self, split: Split) -> Arrays:
        """Features and targets of one split, first axis = samples."""

    def __len__(self) -> int:
        return int(self.get_dataset("train")[0].shape[0])


class ShardLoaderError(FedkubeError, ValueError):
    """The configured loader cannot be found or refuses its options."""


def load_shard(loader: str, options: dict[str, Any]) -> ShardDescriptor:
    if loader.startswith("openfl:"):
        raise ShardLoaderError(f"shard {loader!r} is an OpenFL ShardDescriptor: it serves "
                               f"OpenFL experiments only, not fedkube tasks")
    path = BUILTIN_LOADERS.get(loader, loader)
    module_name, _, class_name = path.partition(":")
    if not class_name:
        raise ShardLoaderError(
            f"unknown shard loader {loader!r}: use one of {sorted(BUILTIN_LOADERS)} "
            "or an import path 'package.module:ClassName'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ShardLoaderError(f"cannot import shard loader {path!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, ShardDescriptor)):
        raise ShardLoaderError(f"{path!r} is not a ShardDescriptor subclass")
    try:
        shard = cls(**options)
    except (TypeError, ValueError) as exc:
        raise ShardLoaderError(f"shard loader {loader!r} refused its options: {exc}") from exc
    return shard


def as_float32(array: npt.ArrayLike) -> npt.NDArray[np.float32]:
    return np.asarray(array, dtype=np.float32)
