"""numpy_array: the bytes a Flower Array carries, written with one copy instead of np.save's three."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedguard.clients.wire.arrays import array_view, numpy_array, numpy_array_record

CASES = [
    np.arange(10, dtype=np.uint64),
    np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    np.array(3.5),
    np.zeros((0, 5)),
    np.array([True, False, True]),
    np.ones(3, dtype=np.complex128),
    np.arange(6, dtype=">f4"),
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    np.arange(16.0).reshape(4, 4)[:, ::2],
]


@pytest.mark.parametrize("values", CASES, ids=lambda v: f"{v.dtype}{v.shape}{'C' if v.flags.c_contiguous else 'x'}")
def test_numpy_array_carries_exactly_what_flower_writes(values):
    ours, flowers = numpy_array(values), Array(values)
    assert (ours.data, ours.dtype, ours.shape, ours.stype) == (flowers.data, flowers.dtype, flowers.shape, flowers.stype)
    assert ours.object_id == flowers.object_id
    np.testing.assert_array_equal(ours.numpy(), values)
    np.testing.assert_array_equal(array_view(ours), values)


def test_numpy_array_copies_the_data():
    values = np.arange(5, dtype=np.float32)
    array = numpy_array(values)
    values[:] = -1  # the caller's vector is reused (a SecAgg+ client overwrites its input when masking)
    np.testing.assert_array_equal(array.numpy(), np.arange(5, dtype=np.float32))


def test_numpy_array_record_matches_a_torch_state_dict_record():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GroupNorm(2, 4))
    state = model.state_dict()
    ours = numpy_array_record({key: tensor.detach().numpy() for key, tensor in state.items()})
    flowers = ArrayRecord(state)
    assert list(ours.keys()) == list(flowers.keys())
    assert all(ours[key].data == flowers[key].data for key in state)


def test_numpy_array_writes_what_flower_writes_past_the_version_1_header_limit():
    """A header over 64 KiB (here a 4,000-field record dtype): np.save switches to .npy format
    2.0, which the version 1.0 writer refuses; the bytes must still be Flower's own."""
    values = np.zeros(2, dtype=[(f"field{i}", "<f4") for i in range(4000)])
    ours, flowers = numpy_array(values), Array(values)
    assert (ours.data, ours.dtype, ours.shape) == (flowers.data, flowers.dtype, flowers.shape)

