"""Tensor transport: models cut into stream-sized pieces and joined back."""

from __future__ import annotations

import contextlib

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkube.proto import base_pb2
from fedkube.transport.tensors import (
    TensorError,
    model_to_proto,
)


@pytest.mark.parametrize("chunk_bytes", [7, 4096, 1 << 20])
def test_encoded_results_are_the_bytes_protobuf_would_write(chunk_bytes: int) -> None:
    """Model arrays streamed from memory give exactly TaskResults.SerializeToString()."""
    from fedkube.proto import aggregator_pb2
    from fedkube.transport.tensors import (
        chunk_frames,
        encode_task_results,
        metric_tensors,
        to_named_tensor,
    )

    arrays: list[tuple[str, npt.ArrayLike]] = [
        ("w", np.arange(30_000, dtype=np.float32).reshape(300, 100)),
        ("b", np.float32(2.5)), ("empty", np.zeros(0, np.float32))]
    header = aggregator_pb2.MessageHeader(sender="env1", federation_uuid="exp")
    small = list(metric_tensors({"loss": 0.25}, 3))
    expected = aggregator_pb2.TaskResults(
        header=header, round_number=3, task_name="train", data_size=10,
        tensors=[*small, *(to_named_tensor(n, a, round_number=3) for n, a in arrays)])
    results = aggregator_pb2.TaskResults(header=header, round_number=3, task_name="train",
                                         data_size=10, tensors=small)
    chunks = [base_pb2.DataStream.FromString(frame) for frame in
              chunk_frames(encode_task_results(results, arrays), chunk_bytes)]
    assert all(c.size == len(c.npbytes) == chunk_bytes for c in chunks[:-1])
    assert b"".join(c.npbytes for c in chunks) == expected.SerializeToString()


def test_an_encoded_model_is_the_bytes_protobuf_would_write() -> None:
    from fedkube.transport.tensors import encode_model

    model = {"w": np.arange(30_000, dtype=np.float32).reshape(300, 100),
             "b": np.array(2.5, np.float32), "empty": np.zeros(0, np.float32),
             "cube": np.ones((2, 3, 4), np.float32)}
    for round_number in (0, 7, 2**31 - 1):
        expected = model_to_proto(model, round_number).SerializeToString()
        assert b"".join(bytes(s) for s in encode_model(model, round_number)) == expected


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), max_size=4), names=st.lists(st.text(max_size=8),
                                                                       max_size=4),
       round_number=st.integers(0, 2**31 - 1), task=st.text(max_size=20))
def test_in_place_parse_matches_protobuf(sizes: list[int], names: list[str],
                                         round_number: int, task: str) -> None:
    from fedkube.proto import aggregator_pb2
    from fedkube.transport.tensors import parse_task_results, to_named_tensor

    tensors = [to_named_tensor(name, np.arange(size, dtype=np.float32), round_number=size)
               for name, size in zip(names, sizes, strict=False)]
    original = aggregator_pb2.TaskResults(
        header=aggregator_pb2.MessageHeader(sender="s", federation_uuid="e"),
        round_number=round_number, task_name=task, data_size=3, tensors=tensors)
    wire = bytearray(original.SerializeToString())
    message, payloads = parse_task_results(memoryview(wire))
    assert [bytes(p) for p in payloads] == [t.data_bytes for t in original.tensors]
    for tensor, payload in zip(message.tensors, payloads, strict=True):
        tensor.data_bytes = bytes(payload)
    assert message == original


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_in_place_parse_refuses_garbage_cleanly(data: bytes) -> None:
    from google.protobuf.message import DecodeError

    from fedkube.transport.tensors import parse_task_results

    with contextlib.suppress(ValueError, DecodeError):
        parse_task_results(memoryview(data))


def test_tensor_reply_parsed_in_place() -> None:
    from fedkube.proto import aggregator_pb2
    from fedkube.transport.tensors import parse_tensor_response, to_named_tensor

    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    reply = aggregator_pb2.GetAggregatedTensorResponse(
        header=aggregator_pb2.MessageHeader(sender="aggregator", receiver="env1"),
        round_number=4, tensor=to_named_tensor("w", values, round_number=4))
    message, array = parse_tensor_response(reply.SerializeToString())
    np.testing.assert_array_equal(array, values)
    assert message.round_number == 4 and message.tensor.name == "w"
    assert message.header.receiver == "env1" and message.tensor.data_bytes == b""
    bad = aggregator_pb2.GetAggregatedTensorResponse(tensor=to_named_tensor("w", values))
    bad.tensor.data_bytes = bad.tensor.data_bytes[:-4]
    with pytest.raises(TensorError, match="44 bytes do not hold"):
        parse_tensor_response(bad.SerializeToString())


@pytest.mark.parametrize("chunk_bytes", [5, 4096, 1 << 20])
def test_streamed_tensor_reply_is_the_unary_reply_and_lands_in_a_reused_buffer(
        chunk_bytes: int) -> None:
    from fedkube.proto import aggregator_pb2
    from fedkube.transport.tensors import (
        StreamReceiver,
        chunk_frames,
        encode_tensor_response,
        parse_tensor_response,
        to_named_tensor,
    )

    header = aggregator_pb2.MessageHeader(sender="aggregator", receiver="env1",
                                          federation_uuid="exp")
    values = np.arange(3 * 1000, dtype=np.float32).reshape(3, 1000)
    unary = aggregator_pb2.GetAggregatedTensorResponse(
        header=header, round_number=4,
        tensor=to_named_tensor("w", values, round_number=4)).SerializeToString()
    chunks = list(chunk_frames(encode_tensor_response(header, 4, "w", values), chunk_bytes))
    # The frames are DataStream messages' wire bytes, each chunk_bytes but the last.
    messages = [base_pb2.DataStream.FromString(c) for c in chunks]
    assert all(m.size == len(m.npbytes) == chunk_bytes for m in messages[:-1])
    receiver = StreamReceiver()
    joined = receiver.receive("w", chunks)
    assert bytes(joined) == unary  # byte for byte what GetAggregatedTensor sends
    reply, got = parse_tensor_response(joined)
    assert reply.round_number == 4 and reply.tensor.name == "w"
    np.testing.assert_array_equal(got, values)
    # The next round reuses the same memory (already faulted in)...
    again = receiver.receive("w", chunks)
    assert again.obj is joined.obj
    # ...and a larger tensor moves to a larger buffer even while the task still holds
    # views of the old one (a bytearray with views cannot be resized).
    bigger = np.ones(100_000, np.float32)  # past any doubling of the old buffer
    grown = receiver.receive("w", chunk_frames(encode_tensor_response(header, 5, "w", bigger),
                                               chunk_bytes))
    assert grown.obj is not joined.obj
    np.testing.assert_array_equal(parse_tensor_response(grown)[1], bigger)
    assert got.shape == (3, 1000)  # still a valid (if overwritten) view
