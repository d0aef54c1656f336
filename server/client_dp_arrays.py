"""Array arithmetic of the server's DP-FedAvg release: the Gaussian on the clipped sum, and
the noised mean laid back onto the global model (kept apart so server/client_dp.py stays
about the mechanism's decisions)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from fedguard.clients.wire.arrays import array_view


def add_central_noise(total: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """total + N(0, std²) per coordinate: the Gaussian mechanism on the sum of clipped updates."""
    return total + rng.normal(0.0, std, size=total.shape) if std > 0 else total.copy()


def unflatten_onto(base: ArrayRecord, delta: np.ndarray) -> ArrayRecord:
    """base + delta (flat, in base's key order), in base's dtypes."""
    arrays, offset = {}, 0
    for key in base.keys():
        values = array_view(base[key])
        part = delta[offset : offset + values.size].reshape(values.shape)
        arrays[key] = Array((values.astype(np.float64) + part).astype(values.dtype))
        offset += values.size
    return ArrayRecord(arrays)
