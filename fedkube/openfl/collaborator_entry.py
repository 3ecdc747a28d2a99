"""OpenFL's own collaborator for one experiment, as OpenFL 1.6's envoy runs it.

Run as a script by the Python of an OpenFL 1.6 environment (OpenFL pins protobuf<5, so it
cannot share fedkube's), never imported by fedkube: it imports nothing of fedkube. The
fedkube collaborator has extracted the experiment's archive into the workspace; this
parses its plan and runs `plan.get_collaborator(...).run()` with the shard served either by
an OpenFL ShardDescriptor class the data owner names (`--descriptor module.Class`, its
params as JSON, as in OpenFL's envoy_config.yaml) or by a fedkube shard loader's arrays
(`--arrays shard.npz`, written by the fedkube collaborator).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any


class ArraysDataset:
    """(sample, target) pairs of two arrays, as OpenFL's ShardDataset serves them."""

    def __init__(self, samples: Any, targets: Any) -> None:
        self.samples, self.targets = samples, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.samples[index], self.targets[index]


class ArraysShardDescriptor:
    """A fedkube shard's train and val splits as an OpenFL ShardDescriptor."""

    def __init__(self, path: Path) -> None:
        import numpy as np

        with np.load(path) as arrays:
            self.splits = {split: ArraysDataset(arrays[f"{split}_x"], arrays[f"{split}_y"])
                           for split in ("train", "val")}
            self.meta = json.loads(str(arrays["meta"]))

    def get_dataset(self, dataset_type: str = "train") -> ArraysDataset:
        return self.splits[dataset_type]

    @property
    def sample_shape(self) -> list[str]:
        return list(self.meta["sample_shape"])

    @property
    def target_shape(self) -> list[str]:
        return list(self.meta["target_shape"])

    @property
    def dataset_description(self) -> str:
        return str(self.meta["description"])


def descriptor(template: str, params: dict[str, Any]) -> Any:
    module, _, name = template.rpartition(".")
    return getattr(importlib.import_module(module), name)(**params)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedkube-openfl-collaborator")
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--descriptor", help="an OpenFL ShardDescriptor: module.Class")
    parser.add_argument("--params", default="{}", help="its parameters, as JSON")
    parser.add_argument("--arrays", type=Path, help="a fedkube shard's arrays (.npz)")
    parser.add_argument("--describe", action="store_true",
                        help="print the shard's description and shapes as JSON, and exit")
    parser.add_argument("--cuda-devices", default="")
    parser.add_argument("--ca")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args(argv)
    shard = (ArraysShardDescriptor(args.arrays) if args.arrays
             else descriptor(args.descriptor, json.loads(args.params)))
    if args.describe:
        print(json.dumps({"description": shard.dataset_description,
                          "sample_shape": [str(s) for s in shard.sample_shape],
                          "target_shape": [str(s) for s in shard.target_shape],
                          "samples": len(shard.get_dataset("train"))}))
        return 0

    from openfl.federated import Plan  # type: ignore[import-not-found]
    from openfl.interface.cli import setup_logging  # type: ignore[import-not-found]

    setup_logging()  # as `fx` does: OpenFL's loggers need its METRIC level
    os.chdir(args.workspace)
    sys.path.insert(0, str(args.workspace))  # the experiment's modules, as OpenFL's envoy
    plan = Plan.parse(plan_config_path=Path("plan/plan.yaml"))
    collaborator = plan.get_collaborator(args.name, args.ca, args.key, args.cert,
                                         shard_descriptor=shard)
    devices = tuple(int(d) for d in args.cuda_devices.split(",") if d)
    collaborator.set_available_devices(cuda=devices)
    collaborator.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
