"""A model's arrays as flat float64 vectors: what clipping, noise, masking and the
server's aggregate all work on, read without copies from Flower's serialized ``Array``."""

from __future__ import annotations

import io
import math

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType


def array_view(array: Array) -> np.ndarray:
    """Read-only ndarray over a numpy-serialized Flower ``Array``'s bytes, without a copy.

    ``Array.numpy()`` parses through ``np.load`` on a BytesIO, which copies the data (and
    touches fresh pages) each time; SecAgg+ reads model-sized arrays several times per
    client per round. Object arrays fall back to ``Array.numpy()`` (which refuses pickles).
    """
    header = io.BytesIO(array.data)
    version = np.lib.format.read_magic(header)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(header)
    if dtype.hasobject:
        return array.numpy()
    values = np.frombuffer(array.data, dtype=dtype, count=math.prod(shape), offset=header.tell())
    return values.reshape(shape, order="F" if fortran else "C")


def flatten_update(new: ArrayRecord, old: ArrayRecord, dtype: np.dtype | type = np.float64) -> np.ndarray:
    """new - old, flattened in the ArrayRecord's key order (the server unflattens in the same order).

    Written into one preallocated vector of ``dtype`` (no per-tensor temporaries). The
    subtraction runs in ``dtype``: float64 (the default) for clipping and noise; a SecAgg+
    client that holds its update as float32 asks for float32, the exact difference rounded
    once, instead of a float64 vector it would copy down right away.
    """
    if list(new.keys()) != list(old.keys()):
        raise ValueError("the trained model's arrays differ from the global model's")
    olds = [array_view(old[key]) for key in old.keys()]
    flat = np.empty(sum(a.size for a in olds), dtype=dtype)
    offset = 0
    for key, before in zip(old.keys(), olds):
        after = array_view(new[key])
        if after.shape != before.shape:
            raise ValueError(f"array {key!r} changed shape from {before.shape} to {after.shape}")
        np.subtract(after, before, out=flat[offset : offset + before.size].reshape(before.shape), dtype=dtype)
        offset += before.size
    return flat


def numpy_array(values: np.ndarray) -> Array:
    """A Flower ``Array`` holding exactly the bytes ``Array(values)`` would (``np.save``'s
    ``.npy`` format), written with one copy of the data instead of three.

    ``Array(values)`` goes through ``np.save`` into a BytesIO: ``tobytes`` copies the data,
    the BytesIO write copies it again and ``getvalue`` a third time. A SecAgg+ client does
    this per round for its trained model, its held update and its masked input (8 MB at 1M
    parameters); here the header (numpy's own writer) and the data are joined into the one
    ``bytes`` object the ``Array`` keeps. Arrays that are not C-contiguous, or hold objects,
    go through ``Array(values)`` unchanged.
    """
    if values.dtype.hasobject or not values.flags.c_contiguous:
        return Array(values)
    header = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(values))
    except ValueError:  # a header over 64 KiB: np.save writes format 2.0 there, so let Array(values) do it
        return Array(values)
    data = b"".join((header.getvalue(), memoryview(values.reshape(-1).view(np.uint8))))
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype=SType.NUMPY, data=data)


def numpy_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` of ``numpy_array``s, in ``arrays``' key order."""
    return ArrayRecord({key: numpy_array(values) for key, values in arrays.items()})
