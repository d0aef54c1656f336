"""A model's arrays as flat float64 vectors: what clipping, noise, masking and the
server's aggregate all work on, read without copies from Flower's serialized ``Array``."""

from __future__ import annotations

import io
import math

import numpy as np
from flwr.app import Array, ArrayRecord


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
