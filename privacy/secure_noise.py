"""Gaussian noise from a cryptographically secure generator (``privacy.secure_noise=true``).

torch's generators (Mersenne Twister, Philox) are fast but predictable from enough outputs,
and Opacus's ``secure_mode`` needs torchcsprng, which does not exist for this torch. Here the
bits come from a ChaCha20 keystream (the ``cryptography`` package) keyed with 32 bytes from
``os.urandom``, fresh for each source; the key is never stored or sent.

Bits to Gaussians: 53-bit uniforms in (0, 1], then Box-Muller. Textbook floating-point
Gaussian samplers leak through the set of representable outputs (Mironov 2012; Jin et al.
2021 for Opacus). As Opacus's secure_mode does (Holohan & Braghin 2021, n = 2), each noise
value is the sum of four independent N(0, std^2) draws divided by 2, which has the same
distribution N(0, std^2) and makes the attack's search space about 2^159 instead of 2^53.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32
NONCE_BYTES = 16  # cryptography's ChaCha20 nonce: 4-byte counter + 12-byte nonce
MANTISSA_BITS = 53
SUMMANDS = 4  # Holohan & Braghin's n = 2: 2n draws, sum / sqrt(2n)


class SecureGaussian:
    """A source of N(0, std^2) values from a ChaCha20 keystream keyed from the OS."""

    def __init__(self) -> None:
        cipher = Cipher(algorithms.ChaCha20(os.urandom(KEY_BYTES), os.urandom(NONCE_BYTES)), mode=None)
        self._keystream = cipher.encryptor()

    def uniform(self, count: int) -> np.ndarray:
        """``count`` float64 values uniform on (0, 1] (never 0: Box-Muller takes a log)."""
        words = np.frombuffer(self._keystream.update(bytes(8 * count)), dtype=np.uint64)
        return ((words >> np.uint64(64 - MANTISSA_BITS)) + 1).astype(np.float64) * 2.0**-MANTISSA_BITS

    def standard_normal(self, count: int) -> np.ndarray:
        """``count`` independent N(0, 1) values by Box-Muller (both outputs of each pair used)."""
        pairs = (count + 1) // 2
        u1, u2 = self.uniform(pairs), self.uniform(pairs)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * np.pi * u2
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]

    def gaussian(self, std: float, reference: torch.Tensor) -> torch.Tensor:
        """N(0, std^2) noise shaped like ``reference`` (its dtype and device), hardened by summing."""
        if std == 0:
            return torch.zeros_like(reference)
        count = reference.numel()
        draws = self.standard_normal(SUMMANDS * count).reshape(SUMMANDS, count).sum(axis=0)
        values = draws * (std / np.sqrt(SUMMANDS))
        return torch.from_numpy(values).reshape(reference.shape).to(device=reference.device, dtype=reference.dtype)
