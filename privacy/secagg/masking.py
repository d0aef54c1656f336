"""Masks expanded from agreed keys by a ChaCha20 keystream, and quantized modular arithmetic.

Flower's SecAgg+ expands masks with numpy's RandomState from a 32-bit seed; here every
mask word comes from ChaCha20 keyed with the full 256-bit agreed key.

Speed: a client adds one mask per neighbour plus its self-mask, and the server removes
one self-mask per survivor, each as long as the model. ``apply_masks`` does this in
place, a cache-sized chunk of keystream at a time, and reduces modulo 2^bits once at
the end: 2^bits divides 2^64, so uint64 wrap-around keeps every intermediate sum
congruent to the exact one. The masks are the same words ``expand_mask`` returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

MAX_MODULUS_BITS = 62  # sums stay exact in uint64 with headroom for the modular reduction
CHACHA_NONCE = b"\0" * 16  # each key is used for exactly one mask, so a fixed nonce is safe
WORD_BYTES = 8
# Keystream words produced per cipher call: 1 MiB, small enough to stay in cache while
# it is added into the vector, large enough that the Python loop costs nothing.
CHUNK_WORDS = 1 << 17
ADD, SUBTRACT = 1, -1
# Largest level count: float64 represents every integer up to 2^53 exactly (see levels_for).
MAX_LEVELS = 1 << 53
# Entries quantized per step: the working buffers (3 x 512 KiB) stay in cache.
QUANTIZE_CHUNK = 1 << 16


class QuantizationError(ValueError):
    """The quantization settings cannot represent a sum of this many clients."""


def _check_bits(modulus_bits: int) -> None:
    if not 1 <= modulus_bits <= MAX_MODULUS_BITS:
        raise QuantizationError(f"modulus bits must be in 1..{MAX_MODULUS_BITS}; got {modulus_bits}")


def _keystream(key: bytes):
    return Cipher(algorithms.ChaCha20(key, CHACHA_NONCE), mode=None).encryptor()


def expand_mask(key: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """``length`` words uniform in [0, 2^modulus_bits), from a ChaCha20 keystream (vectorised)."""
    _check_bits(modulus_bits)
    return apply_masks(np.zeros(length, dtype=np.uint64), [(key, ADD)], modulus_bits)


def apply_masks(total: np.ndarray, masks: Sequence[tuple[bytes, int]], modulus_bits: int) -> np.ndarray:
    """In place: ``total`` + sum of sign x mask(key) over ``masks``, modulo 2^modulus_bits.

    ``total`` must be a contiguous, writable uint64 vector; ``sign`` is ADD or SUBTRACT.
    Returns ``total``, reduced into [0, 2^modulus_bits).
    """
    _check_bits(modulus_bits)
    if total.dtype != np.uint64 or total.ndim != 1 or not total.flags.c_contiguous or not total.flags.writeable:
        raise ValueError("masks apply to a contiguous, writable uint64 vector")
    if any(sign not in (ADD, SUBTRACT) for _, sign in masks):
        raise ValueError("each mask's sign must be ADD or SUBTRACT")
    length = len(total)
    chunk = min(CHUNK_WORDS, max(length, 1))
    zeros = bytes(chunk * WORD_BYTES)
    # update_into may need up to a block of slack beyond the input's length.
    scratch = bytearray(chunk * WORD_BYTES + 64)
    words = np.frombuffer(scratch, dtype=np.uint64, count=chunk)
    streams = [(_keystream(key), np.add if sign == ADD else np.subtract) for key, sign in masks]
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        part, size = total[start:stop], stop - start
        for stream, combine in streams:
            stream.update_into(zeros[: size * WORD_BYTES], scratch)
            combine(part, words[:size], out=part)
    np.bitwise_and(total, np.uint64((1 << modulus_bits) - 1), out=total)
    return total


def levels_for(modulus_bits: int, max_clients: int) -> int:
    """Quantization levels per value such that the sum of ``max_clients`` values never wraps.

    Capped at 2^53: quantization runs in float64, which holds integers exactly only up to
    2^53. Above it ``float(levels)`` rounds up, a value at the clip range quantizes to more
    than ``levels``, and the sum of a few such values wraps modulo 2^bits to the wrong sign.
    """
    levels = min(((1 << modulus_bits) - 1) // max(max_clients, 1), MAX_LEVELS)
    if levels < 2:
        raise QuantizationError(
            f"{modulus_bits} modulus bits leave fewer than 2 levels per value for {max_clients} clients"
        )
    return levels


def quantize(
    values: np.ndarray,
    clip_range: float,
    levels: int,
    rng: np.random.Generator,
    out: np.ndarray | None = None,
    *,
    value_clip: float | None = None,
    weight: float = 1.0,
) -> np.ndarray:
    """Clip to [-clip_range, clip_range] and map to integers 0..levels with unbiased stochastic rounding.

    Chunk by chunk through small reused buffers: on a million-entry vector each full-size
    temporary costs fresh pages, and this runs once per client per round. ``out``, a
    uint64 array of ``values``' size, receives the result (else a new one is returned).

    With ``value_clip``, what is quantized is ``clip(values, ±value_clip) x weight`` (a
    client's weighted update): the same float64 operations, in the same order, as
    quantizing ``np.clip(values, -value_clip, value_clip, dtype=np.float64) * weight``
    would apply, so the result and the random draws are identical; only the model-sized
    float64 copy of the update is never made (it cost a SecAgg+ client ~10 ms a round
    at 1M parameters).
    """
    flat = np.asarray(values).reshape(-1)
    if out is not None and (out.dtype != np.uint64 or out.size != flat.size):
        raise ValueError(f"out must be a uint64 array of {flat.size} entries")
    if value_clip is None and weight != 1.0:
        raise ValueError("a weight applies only together with value_clip")
    result = np.empty(flat.size, dtype=np.uint64) if out is None else out.reshape(-1)
    scale = levels / (2 * clip_range)
    chunk = min(QUANTIZE_CHUNK, max(flat.size, 1))
    scaled, floor, noise = (np.empty(chunk, dtype=np.float64) for _ in range(3))
    round_up = np.empty(chunk, dtype=bool)
    for start in range(0, flat.size, chunk):
        size = min(chunk, flat.size - start)
        part, low, draw, up = scaled[:size], floor[:size], noise[:size], round_up[:size]
        if value_clip is None:
            np.clip(flat[start : start + size], -clip_range, clip_range, out=part)
        else:
            np.clip(flat[start : start + size], -value_clip, value_clip, out=part, dtype=np.float64)
            part *= weight
            np.clip(part, -clip_range, clip_range, out=part)
        part += clip_range
        part *= scale
        np.floor(part, out=low)
        part -= low  # the fractional part: round up with exactly this probability
        rng.random(out=draw)
        np.less(draw, part, out=up)
        low += up
        np.minimum(low, levels, out=low)
        result[start : start + size] = low
    return result.reshape(np.shape(values)) if out is None else out


def dequantize_sum(total: np.ndarray, num_clients: int, clip_range: float, levels: int) -> np.ndarray:
    """Turn the exact integer sum of ``num_clients`` quantized vectors back into a float sum."""
    return total.astype(np.float64) * (2 * clip_range / levels) - num_clients * clip_range


def add_mod(a: np.ndarray, b: np.ndarray, modulus_bits: int) -> np.ndarray:
    return (a + b) & np.uint64((1 << modulus_bits) - 1)


def sub_mod(a: np.ndarray, b: np.ndarray, modulus_bits: int) -> np.ndarray:
    return (a - b) & np.uint64((1 << modulus_bits) - 1)
