"""Masks expanded from agreed keys by a ChaCha20 keystream, and quantized modular arithmetic.

Flower's SecAgg+ expands masks with numpy's RandomState from a 32-bit seed; here every
mask word comes from ChaCha20 keyed with the full 256-bit agreed key.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

MAX_MODULUS_BITS = 62  # sums stay exact in uint64 with headroom for the modular reduction
CHACHA_NONCE = b"\0" * 16  # each key is used for exactly one mask, so a fixed nonce is safe


class QuantizationError(ValueError):
    """The quantization settings cannot represent a sum of this many clients."""


def expand_mask(key: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """``length`` words uniform in [0, 2^modulus_bits), from a ChaCha20 keystream (vectorised)."""
    if not 1 <= modulus_bits <= MAX_MODULUS_BITS:
        raise QuantizationError(f"modulus bits must be in 1..{MAX_MODULUS_BITS}; got {modulus_bits}")
    stream = Cipher(algorithms.ChaCha20(key, CHACHA_NONCE), mode=None).encryptor().update(bytes(8 * length))
    words = np.frombuffer(stream, dtype=np.uint64)
    return words & np.uint64((1 << modulus_bits) - 1)


def levels_for(modulus_bits: int, max_clients: int) -> int:
    """Quantization levels per value such that the sum of ``max_clients`` values never wraps."""
    levels = ((1 << modulus_bits) - 1) // max(max_clients, 1)
    if levels < 2:
        raise QuantizationError(
            f"{modulus_bits} modulus bits leave fewer than 2 levels per value for {max_clients} clients"
        )
    return levels


def quantize(values: np.ndarray, clip_range: float, levels: int, rng: np.random.Generator) -> np.ndarray:
    """Clip to [-clip_range, clip_range] and map to integers 0..levels with unbiased stochastic rounding."""
    scaled = (np.clip(values, -clip_range, clip_range) + clip_range) * (levels / (2 * clip_range))
    floor = np.floor(scaled)
    rounded = floor + (rng.random(scaled.shape) < (scaled - floor))
    return np.minimum(rounded, levels).astype(np.uint64)


def dequantize_sum(total: np.ndarray, num_clients: int, clip_range: float, levels: int) -> np.ndarray:
    """Turn the exact integer sum of ``num_clients`` quantized vectors back into a float sum."""
    return total.astype(np.float64) * (2 * clip_range / levels) - num_clients * clip_range


def add_mod(a: np.ndarray, b: np.ndarray, modulus_bits: int) -> np.ndarray:
    return (a + b) & np.uint64((1 << modulus_bits) - 1)


def sub_mod(a: np.ndarray, b: np.ndarray, modulus_bits: int) -> np.ndarray:
    return (a - b) & np.uint64((1 << modulus_bits) - 1)
