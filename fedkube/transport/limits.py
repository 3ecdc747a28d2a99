"""Message size limits shared by servers and clients."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
# A single unary message (a tensor request, a health check) never needs more than this;
# models and archives travel as streams of chunks.
MAX_MESSAGE_BYTES = 64 * MiB
# What a server may send and a client receive in one message: a whole tensor
# (GetAggregatedTensor) or model (GetTrainedModel) is one message in OpenFL's protocol,
# and protobuf caps a message at 2 GiB. Servers still refuse requests over 64 MiB.
MAX_REPLY_BYTES = (1 << 31) - 1
CHUNK_BYTES = 2 * MiB
# The largest initial model a director takes with an experiment (sent in pieces) when
# its memory allows it: the default of `--max-model-bytes` (default_max_model_bytes).
MAX_MODEL_BYTES = 16 * GiB
# The director's memory over the largest initial model it takes by default. Running an
# experiment, the aggregator holds its model, the round's FedAvg sums (float32: the
# model's size again) and a result being received (a model's size per collaborator
# upload under way); the fourth share is for everything else (the interpreter, other
# experiments, gRPC's buffers). OpenFL's adaptive optimizers (adam, yogi, adagrad) keep
# two float64 moments more (4x the model): a director running those wants a lower
# --max-model-bytes, or more memory.
MODEL_MEMORY_SHARE = 4
# Request metadata of SetNewExperiment: the bytes of the initial model's tensors, sent by
# fedkube's client so that a model over the limit is refused before any of it is sent.
MODEL_BYTES_HEADER = "fedkube-model-bytes"
# Largest experiment archive a director accepts.
MAX_ARCHIVE_BYTES = 512 * MiB

_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a huge number (2^63 - a page)
_CGROUP = Path("/sys/fs/cgroup")


def memory_bytes() -> int | None:
    """The memory this process may use: its cgroup's limit (v2 memory.max or v1
    memory.limit_in_bytes, of its own cgroup or any above it) when lower than the
    machine's physical memory; None when neither can be read."""
    sizes = [limit for path in _cgroup_limit_files() if (limit := _read_limit(path))]
    with contextlib.suppress(ValueError, OSError, AttributeError):
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    sizes = [size for size in sizes if size > 0]
    return min(sizes) if sizes else None


def default_max_model_bytes() -> int:
    """The largest initial model a director takes unless told (--max-model-bytes): a
    MODEL_MEMORY_SHARE of its memory, at most MAX_MODEL_BYTES."""
    memory = memory_bytes()
    return MAX_MODEL_BYTES if memory is None else min(MAX_MODEL_BYTES,
                                                      memory // MODEL_MEMORY_SHARE)


def _cgroup_limit_files() -> list[Path]:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    files = [_CGROUP / "memory.max", _CGROUP / "memory" / "memory.limit_in_bytes"]
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "":  # cgroup v2: the limit of any cgroup above counts too
            here = _CGROUP / path.lstrip("/")
            files += [directory / "memory.max" for directory in (here, *here.parents)
                      if directory.is_relative_to(_CGROUP)]
        elif "memory" in controllers.split(","):  # cgroup v1
            files.append(_CGROUP / "memory" / path.lstrip("/") / "memory.limit_in_bytes")
    return files


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # "max": none
        return None
    value = int(text)
    return value if 0 < value < _UNLIMITED else None


_KEEPALIVE: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
GRPC_OPTIONS: list[tuple[str, int]] = [  # clients
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
    *_KEEPALIVE,
]
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_REPLY_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *_KEEPALIVE,
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_concurrent_streams", 10_000),
    # Calls that arrived before the server asked for them. gRPC's default of 1,000 made it
    # cancel some of the registrations of a few thousand envoys arriving at once (a
    # director restart); queued, they are answered within their deadline instead.
    ("grpc.server.max_pending_requests", 10_000),
    ("grpc.server.max_pending_requests_hard_limit", 20_000),
]
