"""An initial model on disk, written as it arrives and read back without a copy.

SetNewExperiment brings the initial model over many messages: fedkube's client cuts each
tensor's bytes into stream-sized pieces, its metadata on the first (model_pieces);
OpenFL's client sends the whole model with every chunk of the archive. `ModelWriter`
appends each piece's bytes to `initial_model.f32` as it comes, so the director holds one
message, never the model (a protobuf message cannot pass 2 GiB, and joining the pieces
into one cost three copies of the model). A tensor's shape is checked against its bytes
once it is whole, and `initial_model.json` (each tensor's name, shape, offset and size)
is written last: its presence says the model is whole.

`read_model` maps the data file and gives each tensor as a read-only view of it: the
model is in memory once, in the page cache, which the kernel may drop under pressure and
read again. Directories written before this format hold `initial_model.pb` (a serialized
ModelProto), which is still read, so their experiments resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from google.protobuf.message import DecodeError

from fedkube.api.errors import FedkubeError
from fedkube.proto import base_pb2
from fedkube.transport.tensors import DTYPE, Model, TensorError, model_from_proto

DATA_FILE = "initial_model.f32"
INDEX_FILE = "initial_model.json"
LEGACY_FILE = "initial_model.pb"
FORMAT = "fedkube-model-files/1"
# Bounds on what a model's index holds in memory while it arrives (its bytes are on disk).
MAX_TENSORS = 1 << 16
MAX_DIMS = 64  # numpy's own limit


class ModelFileError(FedkubeError, ValueError):
    """Model files that cannot be read: damaged, cut short, or not of this format."""


class ModelTooLarge(OverflowError):
    """The model passed the writer's limit; `size` is what it had come to."""

    def __init__(self, limit: int, size: int) -> None:
        super().__init__(f"initial model exceeds {limit} bytes")
        self.limit, self.size = limit, size


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...] | None  # as declared; None: flat, as long as its bytes
    offset: int
    nbytes: int = 0

    @property
    def expected(self) -> int | None:
        return None if self.shape is None else math.prod(self.shape) * DTYPE.itemsize

    def final_shape(self) -> tuple[int, ...]:
        """The shape its bytes fill; TensorError when they do not."""
        shape = self.shape if self.shape is not None else (self.nbytes // DTYPE.itemsize,)
        if self.nbytes != math.prod(shape) * DTYPE.itemsize:
            raise TensorError(f"tensor {self.name!r}: {self.nbytes} bytes do not hold "
                              f"float32 values of shape {shape}")
        return shape


def declared_shape(tensor: base_pb2.NamedTensor) -> tuple[int, ...] | None:
    """The shape a tensor's first piece declares (None: none, a flat tensor)."""
    if not tensor.transformer_metadata:
        return None
    shape = tuple(int(d) for d in tensor.transformer_metadata[0].int_list)
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise TensorError(f"tensor {tensor.name!r}: shape {shape[:MAX_DIMS + 1]} is not "
                          f"one of at most {MAX_DIMS} non-negative sizes")
    return shape


def model_data_bytes(model: base_pb2.ModelProto) -> int:
    """What ModelWriter counts against its limit: the bytes of a model's tensors (from
    their declared shapes; a tensor that declares none is measured) and of their names.
    SetNewExperiment's MODEL_BYTES_HEADER says it."""
    total = sum(len(tensor.name.encode()) for tensor in model.tensors)
    for tensor in model.tensors:
        try:
            shape = declared_shape(tensor)
        except TensorError:  # the director says what is wrong with it
            shape = None
        total += (len(tensor.data_bytes) if shape is None
                  else math.prod(shape) * DTYPE.itemsize)
    return total


class ModelWriter:
    """Writes a model arriving in pieces to `directory`: add() each message's ModelProto,
    then finish(). The pieces of a tensor come one after another, its metadata on the
    first; a tensor sent whole again (OpenFL's client repeats the model with every
    archive chunk) is skipped. Past `limit_bytes` (its tensors' bytes and names) add()
    raises ModelTooLarge before writing the piece (OverflowError past MAX_TENSORS); a
    tensor whose bytes and shape disagree raises TensorError. close() after a failure:
    the caller removes the files."""

    def __init__(self, directory: Path, limit_bytes: int) -> None:
        self.directory, self.limit = directory, limit_bytes
        self.size = 0  # counted against the limit
        self._tensors: dict[str, _Tensor] = {}
        self._current: _Tensor | None = None
        self._end = 0  # of the data file
        self._sink: BinaryIO | None = None

    def add(self, model: base_pb2.ModelProto) -> None:
        for tensor in model.tensors:
            self._add(tensor)

    def _add(self, tensor: base_pb2.NamedTensor) -> None:
        data = tensor.data_bytes  # each access of a bytes field copies it: once only
        known = self._tensors.get(tensor.name)
        if known is None:
            self._begin(tensor)
        elif tensor.transformer_metadata:
            shape = declared_shape(tensor)
            if shape == known.shape and len(data) == known.nbytes == known.expected:
                return  # the same whole tensor again: OpenFL's client repeating the model
            raise TensorError(f"tensor {tensor.name!r} sent twice")
        elif known is not self._current:
            raise TensorError(f"the pieces of tensor {tensor.name!r} came apart: another "
                              "tensor's came between them")
        current = self._current
        assert current is not None
        expected = current.expected
        if expected is not None and current.nbytes + len(data) > expected:
            raise TensorError(f"tensor {current.name!r}: more than the {expected} bytes "
                              f"of its shape {current.shape}")
        self._count(len(data))
        if data:
            assert self._sink is not None
            self._sink.write(data)
        current.nbytes += len(data)
        self._end += len(data)

    def _begin(self, tensor: base_pb2.NamedTensor) -> None:
        """A new tensor: the one before it is whole."""
        if len(self._tensors) >= MAX_TENSORS:
            raise OverflowError(f"an initial model holds at most {MAX_TENSORS} tensors")
        shape = declared_shape(tensor)
        self._count(len(tensor.name.encode()))
        if self._current is not None:
            self._current.final_shape()
        if self._sink is None:
            self._sink = (self.directory / DATA_FILE).open("wb")
        self._current = self._tensors[tensor.name] = _Tensor(tensor.name, shape, self._end)

    def _count(self, nbytes: int) -> None:
        if self.size + nbytes > self.limit:
            raise ModelTooLarge(self.limit, self.size + nbytes)
        self.size += nbytes

    def finish(self) -> bool:
        """Checks the last tensor and writes the index; False (and no files) when no
        tensor came."""
        if self._current is not None:
            self._current.final_shape()
        if self._sink is not None:
            self._sink.close()  # a full disk raises here, if not at a write
        if not self._tensors:
            return False
        index = {"format": FORMAT, "tensors": [
            {"name": t.name, "shape": list(t.final_shape()), "offset": t.offset,
             "bytes": t.nbytes} for t in self._tensors.values()]}
        part = self.directory / f"{INDEX_FILE}.part"
        part.write_text(json.dumps(index))
        os.replace(part, self.directory / INDEX_FILE)
        return True

    def close(self) -> None:
        """Closes the data file after a failure (its own errors are not the failure's)."""
        if self._sink is not None:
            with contextlib.suppress(OSError):
                self._sink.close()


def has_model(directory: Path) -> bool:
    return (directory / INDEX_FILE).exists() or (directory / LEGACY_FILE).exists()


def read_model(directory: Path) -> Model | None:
    """The model stored in `directory` (None if none): ModelWriter's files as read-only
    views of the mapped data file, else an earlier version's initial_model.pb. Raises
    ModelFileError or TensorError (both ValueErrors) when they are damaged."""
    if (directory / INDEX_FILE).exists():
        return _read_files(directory)
    legacy = directory / LEGACY_FILE
    if legacy.exists():
        try:
            return model_from_proto(base_pb2.ModelProto.FromString(legacy.read_bytes()))
        except DecodeError as exc:
            raise ModelFileError(f"{LEGACY_FILE}: {exc}") from exc
    return None


def _read_files(directory: Path) -> Model:
    try:
        index = json.loads((directory / INDEX_FILE).read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ModelFileError(f"{INDEX_FILE}: {exc}") from exc
    entries = _entries(index)
    path = directory / DATA_FILE
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            # The mapping outlives the file: the arrays' base keeps it.
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except OSError as exc:
        raise ModelFileError(f"{DATA_FILE}: {exc}") from exc
    model: Model = {}
    for name, shape, offset, nbytes in entries:
        if nbytes != math.prod(shape) * DTYPE.itemsize or offset + nbytes > size:
            raise ModelFileError(f"{INDEX_FILE}: tensor {name!r} ({nbytes} bytes at "
                                 f"{offset}, shape {shape}) does not fit {DATA_FILE} "
                                 f"({size} bytes)")
        if nbytes == 0 or mapped is None:
            model[name] = np.zeros(shape, DTYPE)
        else:
            values = np.frombuffer(mapped, DTYPE, count=nbytes // DTYPE.itemsize,
                                   offset=offset)
            model[name] = values.reshape(shape)
    return model


def _entries(index: Any) -> list[tuple[str, tuple[int, ...], int, int]]:
    """The index's tensors, each checked to be what ModelWriter writes."""
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ModelFileError(f"{INDEX_FILE}: not a {FORMAT} index")
    entries = []
    for item in index.get("tensors") or ():
        try:
            name, offset, nbytes = item["name"], item["offset"], item["bytes"]
            shape = tuple(item["shape"])
        except (TypeError, KeyError) as exc:
            raise ModelFileError(f"{INDEX_FILE}: a tensor without {exc}") from exc
        numbers = (offset, nbytes, *shape)
        if (not isinstance(name, str) or len(shape) > MAX_DIMS
                or not all(type(n) is int and n >= 0 for n in numbers)):
            raise ModelFileError(f"{INDEX_FILE}: tensor {name!r} is damaged")
        entries.append((name, shape, offset, nbytes))
    return entries
