"""Writing a global model to disk at round close (best.pb, last.pb), which runs on the
director's event loop: fedkube's segments straight from the arrays
(`tensors.encode_model`) against building the protobuf message and serializing it
(`model_to_proto(...).SerializeToString()`, what the director did before, and what
OpenFL's `utils.dump_proto` does). Same bytes; best of three, in seconds.

    python -m benchmarks.model_save --mib 64,256,1024 [--json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.report import report
from fedkube.transport.tensors import Model, encode_model, model_to_proto

MiB = 1 << 20


def write_message(model: Model, path: Path) -> None:
    path.write_bytes(model_to_proto(model, 1).SerializeToString())


def write_segments(model: Model, path: Path) -> None:
    with path.open("wb") as file:
        for segment in encode_model(model, 1):
            file.write(segment)


def best_seconds(write: Callable[[Model, Path], None], model: Model, path: Path) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        write(model, path)
        times.append(time.perf_counter() - start)
        path.unlink()
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", default="64,256,1024")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedkube-save-") as tmp:
        path = Path(tmp) / "model.pb"
        for mib in (int(m) for m in args.mib.split(",")):
            model = {"w": np.full(mib * MiB // 4, 0.5, np.float32)}
            write_segments(model, path)
            assert path.read_bytes() == model_to_proto(model, 1).SerializeToString()
            path.unlink()
            rows.append({"mib": mib, "message_s": best_seconds(write_message, model, path),
                         "segments_s": best_seconds(write_segments, model, path)})
    report("model_save", "Saving a model at round close (s, best of three)",
           ("MiB", "protobuf message", "fedkube segments", "speed-up"),
           [(str(row["mib"]), f"{row['message_s']:.3f}", f"{row['segments_s']:.3f}",
             f"{row['message_s'] / row['segments_s']:.1f}x") for row in rows],
           rows, as_json=args.json)


if __name__ == "__main__":
    main()
