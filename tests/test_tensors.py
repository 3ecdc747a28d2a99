"""Tensor transport: models cut into stream-sized pieces and joined back."""

from __future__ import annotations

import numpy as np
import pytest

from fedkube.proto import base_pb2
from fedkube.transport.tensors import (
    ModelAssembler,
    TensorError,
    model_from_proto,
    model_pieces,
    model_to_proto,
)


def test_pieces_join_back_into_the_same_model() -> None:
    model = {"w": np.arange(10_000, dtype=np.float32).reshape(100, 100),
             "b": np.ones(3, np.float32)}
    pieces = list(model_pieces(model_to_proto(model), 4096))
    assert len(pieces) == 10 + 1  # 40,000 bytes of w in 4 KiB pieces, b in one
    assembler = ModelAssembler(limit_bytes=1 << 20)
    for piece in pieces:
        assembler.add(piece)
    joined = model_from_proto(assembler.model())
    assert set(joined) == {"w", "b"}
    np.testing.assert_array_equal(joined["w"], model["w"])


def test_joined_bytes_must_fill_the_declared_shape() -> None:
    pieces = list(model_pieces(model_to_proto({"w": np.zeros((4, 4), np.float32)}), 16))
    assembler = ModelAssembler(limit_bytes=1 << 20)
    for piece in pieces[:-1]:  # one piece lost
        assembler.add(piece)
    with pytest.raises(TensorError, match=r"48 bytes do not hold float32 values of shape \(4, 4\)"):
        assembler.model()


def test_assembler_refuses_past_its_limit() -> None:
    assembler = ModelAssembler(limit_bytes=100)
    with pytest.raises(OverflowError, match="exceeds 100 bytes"):
        assembler.add(base_pb2.ModelProto(tensors=[base_pb2.NamedTensor(
            name="w", data_bytes=bytes(104))]))
