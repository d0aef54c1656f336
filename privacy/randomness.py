"""Randomness a DP guarantee relies on: drawn from the OS on the party that applies it.

Amplification by subsampling assumes nobody can tell which records a step used, and the
Gaussian mechanism assumes nobody can predict the noise. A generator seeded from the run's
recorded seed (config.yaml), a partition id or a round number satisfies neither: anyone
holding the config can rebuild every Poisson mask and every noise draw. The generators
here are seeded from ``secrets`` (the OS's CSPRNG), created fresh for each use, and the
seed is never stored, logged or sent.

What this does not give: torch's generators (Mersenne Twister on CPU, Philox on CUDA) are
not cryptographically secure, so an observer of enough raw outputs could in principle
recover the state. The raw outputs never leave the party (only clipped, noised sums
do); ``privacy.secure_noise`` (privacy/secure_noise.py) removes even that assumption
for the noise.
"""

from __future__ import annotations

import secrets

import torch

# torch.Generator.manual_seed takes a 64-bit value; 63 bits keeps it a non-negative int64.
SEED_BITS = 63


def os_seed() -> int:
    """A fresh seed from the OS's CSPRNG. Never record or send it."""
    return secrets.randbits(SEED_BITS)


def os_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from OS randomness, for one party's one use."""
    generator = torch.Generator(device=device)
    generator.manual_seed(os_seed())
    return generator
