"""Models on the wire: OpenFL's NamedTensor (float32 bytes, shape in transformer metadata).

OpenFL's NoCompressionPipeline stores the shape as `transformer_metadata[0].int_list` and
the values as little-endian float32; we do the same, so tensors read both ways.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from fedkube.api.errors import FedkubeError
from fedkube.proto import aggregator_pb2, base_pb2

Model = dict[str, npt.NDArray[np.float32]]
DTYPE = np.dtype("<f4")


class TensorError(FedkubeError, ValueError):
    """A tensor whose bytes and declared shape disagree."""


def to_named_tensor(name: str, array: npt.ArrayLike, *, round_number: int = 0,
                    report: bool = False) -> base_pb2.NamedTensor:
    values = np.ascontiguousarray(array, dtype=DTYPE)
    return base_pb2.NamedTensor(
        name=name, round_number=round_number, lossless=True, report=report,
        transformer_metadata=[base_pb2.MetadataProto(int_list=list(values.shape))],
        data_bytes=values.tobytes())


def checked_shape(tensor: base_pb2.NamedTensor, nbytes: int) -> tuple[int, ...]:
    """The tensor's declared shape (flat when it declares none), which nbytes of float32
    must fill exactly. Takes the byte count so callers read `data_bytes` (a copy) once."""
    if not tensor.transformer_metadata:
        shape: tuple[int, ...] = (nbytes // DTYPE.itemsize,)
    else:
        shape = tuple(int(d) for d in tensor.transformer_metadata[0].int_list)
    if nbytes != int(np.prod(shape, dtype=np.int64)) * DTYPE.itemsize:
        raise TensorError(f"tensor {tensor.name!r}: {nbytes} bytes do not hold "
                          f"float32 values of shape {shape}")
    return shape


def from_named_tensor(tensor: base_pb2.NamedTensor, data: bytes | memoryview | None = None
                      ) -> npt.NDArray[np.float32]:
    """The tensor's values; `data` (a view of a received buffer) stands in for its
    data_bytes when the wire parse kept them out of the message."""
    if data is None:
        data = tensor.data_bytes  # each access of a bytes field copies it: once only
    shape = checked_shape(tensor, len(data))  # before frombuffer, which would raise first
    return np.frombuffer(data, dtype=DTYPE).reshape(shape)


def model_to_proto(model: Model, round_number: int = 0) -> base_pb2.ModelProto:
    return base_pb2.ModelProto(tensors=[to_named_tensor(name, value, round_number=round_number)
                                        for name, value in model.items()])


def model_from_proto(proto: base_pb2.ModelProto) -> Model:
    return {tensor.name: from_named_tensor(tensor) for tensor in proto.tensors}


def chunk_message(data: bytes, chunk_bytes: int) -> Iterator[base_pb2.DataStream]:
    """A serialized message cut into DataStream chunks (the SendLocalTaskResults stream)."""
    view = memoryview(data)
    for offset in range(0, len(view), chunk_bytes):
        piece = view[offset:offset + chunk_bytes]
        yield base_pb2.DataStream(size=len(piece), npbytes=bytes(piece))


def model_pieces(model: base_pb2.ModelProto, piece_bytes: int
                 ) -> Iterator[base_pb2.ModelProto]:
    """A model cut to fit stream messages: each piece holds part of one tensor's bytes,
    the first piece of a tensor its metadata too. The pieces of a tensor come in order;
    a small model is one piece per tensor, as OpenFL clients send it."""
    for tensor in model.tensors:
        data = memoryview(tensor.data_bytes)
        for offset in range(0, max(len(data), 1), piece_bytes):
            piece = base_pb2.NamedTensor(name=tensor.name,
                                         data_bytes=bytes(data[offset:offset + piece_bytes]))
            if offset == 0:
                piece.round_number, piece.lossless = tensor.round_number, tensor.lossless
                piece.report = tensor.report
                piece.transformer_metadata.extend(tensor.transformer_metadata)
            yield base_pb2.ModelProto(tensors=[piece])


# Field numbers of the wire contract (protos/fedkube/proto): TaskResults.tensors and
# NamedTensor.data_bytes, each the last field of its message, and the reply's tensor.
_TENSORS_FIELD, _DATA_FIELD = 5, 7
_RESPONSE_TENSOR_FIELD = 3  # GetAggregatedTensorResponse.tensor
_MODEL_TENSORS_FIELD = 1  # ModelProto.tensors


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_key(field: int) -> bytes:
    return _varint(field << 3 | 2)


def encode_task_results(results: aggregator_pb2.TaskResults,
                        arrays: Sequence[tuple[str, npt.ArrayLike]]
                        ) -> list[bytes | memoryview]:
    """The wire bytes of `results` with the model tensors `arrays` appended, as segments
    that reference each array's memory instead of copying it into a message: the same
    bytes SerializeToString would give, without the three model-sized copies
    (tobytes, the protobuf field, the serialized message)."""
    segments: list[bytes | memoryview] = [results.SerializeToString()]
    for name, array in arrays:
        segments += _tensor_field(_TENSORS_FIELD, name, results.round_number, array)
    return segments


def _tensor_field(field: int, name: str, round_number: int, array: npt.ArrayLike
                  ) -> list[bytes | memoryview]:
    """A NamedTensor (as to_named_tensor makes it) as message field `field`: its head as
    bytes, its values as a view of the array's memory."""
    values = np.ascontiguousarray(array, dtype=DTYPE)
    head = base_pb2.NamedTensor(
        name=name, round_number=round_number, lossless=True,
        transformer_metadata=[base_pb2.MetadataProto(int_list=list(values.shape))]
    ).SerializeToString()
    data = values.reshape(-1).data.cast("B")
    # proto3 leaves an empty bytes field out; so do we, to stay byte-identical.
    data_key = _length_key(_DATA_FIELD) + _varint(len(data)) if len(data) else b""
    body = len(head) + len(data_key) + len(data)
    return [_length_key(field) + _varint(body) + head + data_key, data]


def encode_model(model: Model, round_number: int = 0) -> list[bytes | memoryview]:
    """model_to_proto(model, round_number).SerializeToString() as segments that reference
    the arrays: a model is written to disk without the three model-sized copies."""
    return [segment for name, array in model.items()
            for segment in _tensor_field(_MODEL_TENSORS_FIELD, name, round_number, array)]


def encode_tensor_response(header: aggregator_pb2.MessageHeader, round_number: int,
                           name: str, array: npt.ArrayLike) -> list[bytes | memoryview]:
    """The wire bytes of GetAggregatedTensor's reply for `array`, as segments referencing
    the array (what StreamAggregatedTensor sends in chunks, with no model-sized copy)."""
    prefix = aggregator_pb2.GetAggregatedTensorResponse(
        header=header, round_number=round_number).SerializeToString()
    first, data = _tensor_field(_RESPONSE_TENSOR_FIELD, name, round_number, array)
    return [prefix + bytes(first), data]


_STREAM_DATA_FIELD = 2  # DataStream.npbytes


class StreamReceiver:
    """Joins a streamed message (raw DataStream chunks) into a buffer kept from call to
    call under a key, so a model-sized tensor lands in memory already faulted in: fresh
    pages cost far more than the copy on the machines we measured (docs/benchmarks.md)."""

    def __init__(self) -> None:
        self._buffers: dict[str, bytearray] = {}

    def receive(self, key: str, chunks: Iterable[bytes]) -> memoryview:
        """The joined bytes, a view of the key's buffer: valid until its next receive."""
        buffer = self._buffers.get(key, bytearray())
        size = 0
        for raw in chunks:
            _, parts = _take_field(memoryview(raw), _STREAM_DATA_FIELD)
            piece = parts[-1] if parts else memoryview(b"")
            end = size + len(piece)
            if end > len(buffer):
                # A new buffer rather than a resize: views of the old one may be in use.
                grown = bytearray(max(end, 2 * len(buffer)))
                grown[:size] = buffer[:size]
                buffer = grown
            buffer[size:end] = piece
            size = end
        self._buffers[key] = buffer
        return memoryview(buffer)[:size]


def _pieces(segments: Iterable[bytes | memoryview], chunk_bytes: int
            ) -> Iterator[bytes | memoryview]:
    """Wire segments cut into pieces of chunk_bytes (the last one shorter): views of the
    segments where a piece lies within one, else bytes joined from several."""
    pending = bytearray()
    for segment in segments:
        view = memoryview(segment).cast("B")
        while view:
            if not pending and len(view) >= chunk_bytes:  # a whole piece: no copy yet
                yield view[:chunk_bytes]
                view = view[chunk_bytes:]
                continue
            take = min(chunk_bytes - len(pending), len(view))
            pending += view[:take]
            view = view[take:]
            if len(pending) == chunk_bytes:
                yield bytes(pending)
                pending.clear()
    if pending:
        yield bytes(pending)


def chunk_frames(segments: Iterable[bytes | memoryview], chunk_bytes: int
                 ) -> Iterator[bytes]:
    """Wire segments cut into DataStream chunks of chunk_bytes (the last one shorter), as
    the chunks' wire bytes, for calls and handlers with no (de)serializer: one copy per
    chunk, where building DataStream messages and serializing them makes three."""
    for piece in _pieces(segments, chunk_bytes):
        size = _varint(len(piece))
        yield b"".join((b"\x08", size, b"\x12", size, piece))  # size = 1, npbytes = 2


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = view[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _field_end(view: memoryview, pos: int, wire_type: int) -> int:
    """Where a field whose value starts at pos ends."""
    if wire_type == 0:
        return _read_varint(view, pos)[1]
    if wire_type == 1:
        end = pos + 8
    elif wire_type == 5:
        end = pos + 4
    elif wire_type == 2:
        length, pos = _read_varint(view, pos)
        end = pos + length
    else:
        raise ValueError(f"unsupported wire type {wire_type}")
    if end > len(view):
        raise ValueError("field runs past the end of the message")
    return end


def _take_field(view: memoryview, field: int) -> tuple[bytes, list[memoryview]]:
    """The message in `view` split into its other fields' wire bytes and the values of
    length-delimited `field` as views (no copy)."""
    rest, taken, pos = bytearray(), [], 0
    while pos < len(view):
        key, value_at = _read_varint(view, pos)
        end = _field_end(view, value_at, key & 7)
        if key >> 3 == field and key & 7 == 2:
            taken.append(view[_read_varint(view, value_at)[1]:end])
        else:
            rest += view[pos:end]
        pos = end
    return bytes(rest), taken


def _split_tensor(view: memoryview) -> tuple[base_pb2.NamedTensor, memoryview]:
    """A NamedTensor parsed without its data_bytes, and those bytes as a view."""
    rest, data = _take_field(view, _DATA_FIELD)
    # A repeated scalar field: the last occurrence wins, as in protobuf.
    return base_pb2.NamedTensor.FromString(rest), data[-1] if data else view[:0]


def parse_task_results(view: memoryview
                       ) -> tuple[aggregator_pb2.TaskResults, list[memoryview]]:
    """TaskResults parsed in place: the message without its tensors' data_bytes, and
    those bytes as views of `view` (one per tensor, in order), so a model-sized result
    is never copied after reassembly."""
    rest, parts = _take_field(view, _TENSORS_FIELD)
    tensors = [_split_tensor(part) for part in parts]
    message = aggregator_pb2.TaskResults.FromString(rest)
    message.tensors.extend(tensor for tensor, _ in tensors)
    return message, [data for _, data in tensors]


def parse_tensor_response(data: bytes | memoryview
                          ) -> tuple[aggregator_pb2.GetAggregatedTensorResponse,
                                     npt.NDArray[np.float32]]:
    """A GetAggregatedTensor reply's wire bytes parsed in place: the message (its tensor
    without data_bytes) and the values, a view of `data` (writable when data is)."""
    rest, parts = _take_field(memoryview(data), _RESPONSE_TENSOR_FIELD)
    message = aggregator_pb2.GetAggregatedTensorResponse.FromString(rest)
    if not parts:
        return message, from_named_tensor(message.tensor)
    tensor, values = _split_tensor(parts[-1])
    message.tensor.CopyFrom(tensor)
    return message, from_named_tensor(tensor, values)


class ChunkAssembler:
    """Reassembles a chunked message into one buffer allocated up front (grown only if the
    sender sends more than expected): no re-concatenation, one copy per chunk."""

    def __init__(self, expected_bytes: int, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self._buffer = bytearray(min(max(expected_bytes, 1 << 16), limit_bytes))
        self._size = 0

    def add_frame(self, frame: bytes) -> None:
        """A chunk as its DataStream wire bytes (a handler with no deserializer): the
        payload is copied once, into the buffer."""
        size, data = 0, memoryview(b"")
        view, pos = memoryview(frame), 0
        while pos < len(view):
            key, value_at = _read_varint(view, pos)
            end = _field_end(view, value_at, key & 7)
            if key == 0x08:  # size, a varint
                size = _read_varint(view, value_at)[0]
            elif key == 0x12:  # npbytes
                data = view[_read_varint(view, value_at)[1]:end]
            pos = end
        self._append(size, data)

    def _append(self, size: int, data: bytes | memoryview) -> None:
        if size != len(data):
            raise TensorError(f"chunk says {size} bytes but carries {len(data)}")
        end = self._size + len(data)
        if end > self.limit:
            raise OverflowError(f"message exceeds {self.limit} bytes")
        if end > len(self._buffer):
            self._buffer.extend(bytes(max(end, 2 * len(self._buffer)) - len(self._buffer)))
        self._buffer[self._size:end] = data
        self._size = end

    def parse(self) -> tuple[aggregator_pb2.TaskResults, list[memoryview]]:
        """The message and its tensors' bytes as views of this buffer (see
        parse_task_results): keep the assembler while the views are in use."""
        return parse_task_results(memoryview(self._buffer)[:self._size])

    def __len__(self) -> int:
        return self._size


def metric_tensors(metrics: dict[str, float], round_number: int) -> Iterable[base_pb2.NamedTensor]:
    for name, value in metrics.items():
        yield to_named_tensor(name, np.array(value), round_number=round_number, report=True)
