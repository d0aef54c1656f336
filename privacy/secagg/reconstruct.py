"""Rebuilding a client's secret from revealed shares when some shares may be bad.

Why: the shares come from the clients, and a hostile one can reveal garbage, a duplicate
index, or a share of another secret. One bad share among ``threshold`` gives a wrong
secret, and a wrong secret silently corrupts the sum (a wrong seed removes the wrong
self-mask). So every rebuilt mask key is checked against the public key its owner
signed, and every rebuilt seed against the commitment its owner signed at advertise time
(without one, a seed is accepted only from ``threshold + 1`` shares that agree, see
``rebuild``). Other subsets are tried, so extra shares exclude bad ones instead of
failing the round.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

from fedguard.privacy.secagg.errors import SecAggError

# Subsets of shares tried per secret before giving up (each try is one Lagrange interpolation).
MAX_SUBSETS = 64
INDEX_BYTES = 2

logger = logging.getLogger(__name__)


def _subsets(shares: list[bytes], size: int):
    """``size``-subsets of distinct shares with distinct share indices, the given order first."""
    unique = list(dict.fromkeys(shares))
    for subset in itertools.combinations(unique, size):
        if len({share[:INDEX_BYTES] for share in subset}) == size:
            yield list(subset)


def rebuild(
    shares: list[bytes],
    threshold: int,
    combine: Callable[[list[bytes], int], bytes],
    check: Callable[[bytes], bool] | None = None,
    owner: str = "a client",
) -> bytes:
    """The secret behind ``shares``.

    With ``check`` (a mask key: its public key is known), the first ``threshold``-subset
    whose result passes it. Without (a seed), the first ``threshold + 1`` shares that lie on
    one polynomial: the secrets rebuilt without the first and without the last of them
    agree exactly then (two degree t-1 polynomials sharing t-1 points and their value at
    0 are one polynomial), and a bad share among them makes them differ. With exactly
    ``threshold`` shares nothing can be compared: their secret is taken.
    """
    tried = 0
    if check is not None:
        for subset in itertools.islice(_subsets(shares, threshold), MAX_SUBSETS):
            tried += 1
            secret = _combine(combine, subset, threshold)
            if secret is not None and check(secret):
                return secret
    elif len(set(shares)) <= threshold:
        for subset in itertools.islice(_subsets(shares, threshold), 1):
            tried += 1
            if (secret := _combine(combine, subset, threshold)) is not None:
                return secret
    else:
        for subset in itertools.islice(_subsets(shares, threshold + 1), MAX_SUBSETS):
            tried += 1
            first, last = _combine(combine, subset[1:], threshold), _combine(combine, subset[:-1], threshold)
            if first is not None and first == last:
                return first
    raise SecAggError(
        f"{owner}: no consistent {threshold} of the {len(shares)} revealed share(s) rebuild a verified secret "
        f"({tried} subset(s) tried); some shares are bad"
    )


def _combine(combine: Callable[[list[bytes], int], bytes], subset: list[bytes], threshold: int) -> bytes | None:
    try:
        return combine(subset, threshold)
    except ValueError:  # ShamirError and malformed shares
        return None
