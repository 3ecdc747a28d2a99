"""Streaming FedAvg against the stacking definition it replaces."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkube.aggregator.fedavg import BLOCK, StreamingFedAvg


@settings(max_examples=50, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 7), min_size=0, max_size=3), min_size=1,
                       max_size=3),
       weights=st.lists(st.floats(0.01, 1e4), min_size=1, max_size=6),
       seed=st.integers(0, 2**32 - 1))
def test_equals_weighted_average_of_stacked_updates(shapes: list[list[int]],
                                                    weights: list[float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    updates = [{f"t{i}": rng.normal(size=shape).astype(np.float32)
                for i, shape in enumerate(shapes)} for _ in weights]
    fedavg = StreamingFedAvg(updates[0])
    for update, weight in zip(updates, weights, strict=True):
        fedavg.add(update, weight)
    result = fedavg.result()
    for name in updates[0]:
        expected = np.average(np.stack([u[name] for u in updates]), axis=0, weights=weights)
        assert result[name].dtype == np.float32 and result[name].shape == expected.shape
        np.testing.assert_allclose(result[name], expected, rtol=1e-6, atol=1e-6)


def test_tensors_larger_than_one_block() -> None:
    size = 2 * BLOCK + 123
    updates = [np.full(size, value, np.float32) for value in (1.0, 4.0)]
    updates[1][-1] = 10.0
    fedavg = StreamingFedAvg({"w": updates[0]})
    fedavg.add({"w": updates[0]}, 3.0)
    fedavg.add({"w": updates[1]}, 1.0)
    result = fedavg.result()["w"]
    assert result[0] == pytest.approx(1.75) and result[BLOCK + 5] == pytest.approx(1.75)
    assert result[-1] == pytest.approx((3.0 + 10.0) / 4)


def test_refuses_empty_rounds_and_bad_weights() -> None:
    fedavg = StreamingFedAvg({"w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="no updates"):
        fedavg.result()
    with pytest.raises(ValueError, match="positive"):
        fedavg.add({"w": np.ones(3, np.float32)}, 0.0)


@pytest.mark.parametrize("size", [0, 1, 1000, 3 * (1 << 19) + 7])
def test_all_finite_in_blocks_matches_numpy(size: int) -> None:
    from fedkube.aggregator.fedavg import all_finite

    values = np.ones(size, np.float32)
    assert all_finite(values)
    for bad in (np.nan, np.inf, -np.inf):
        if size:
            spoiled = values.copy()
            spoiled[-1] = bad  # in the last, partial block
            assert not all_finite(spoiled)
