"""SecAgg+ building blocks: key agreement, share envelopes, Shamir, masks, quantization."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.secagg.envelope import ShareAuthenticationError, open_sealed, seal
from privacy.secagg.keys import derive_shared_key, generate_key_pair, private_key_bytes, private_key_from_bytes
from privacy.secagg.masking import (
    QuantizationError,
    add_mod,
    dequantize_sum,
    expand_mask,
    levels_for,
    quantize,
    sub_mod,
)
from privacy.secagg.shamir import ShamirError, combine_shares, split_secret

BITS = 32


def test_both_peers_derive_the_same_key_and_purposes_differ():
    alice, bob = generate_key_pair(), generate_key_pair()
    assert derive_shared_key(alice.private, bob.public_bytes, b"mask") == derive_shared_key(
        bob.private, alice.public_bytes, b"mask"
    )
    assert derive_shared_key(alice.private, bob.public_bytes, b"mask") != derive_shared_key(
        alice.private, bob.public_bytes, b"share"
    )
    restored = private_key_from_bytes(private_key_bytes(alice.private))
    assert derive_shared_key(restored, bob.public_bytes, b"mask") == derive_shared_key(
        alice.private, bob.public_bytes, b"mask"
    )


def test_tampered_replayed_or_readdressed_shares_are_rejected():
    key = derive_shared_key(generate_key_pair().private, generate_key_pair().public_bytes, b"share")
    sealed = seal(key, b"secret share", sender=1, receiver=2, server_round=3)
    assert open_sealed(key, sealed, sender=1, receiver=2, server_round=3) == b"secret share"
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(ShareAuthenticationError):
        open_sealed(key, bytes(flipped), sender=1, receiver=2, server_round=3)
    with pytest.raises(ShareAuthenticationError):  # replayed into a later round
        open_sealed(key, sealed, sender=1, receiver=2, server_round=4)
    with pytest.raises(ShareAuthenticationError):  # re-addressed
        open_sealed(key, sealed, sender=3, receiver=2, server_round=3)


@pytest.mark.parametrize(("threshold", "num"), [(2, 3), (3, 5), (4, 4), (5, 9)])
def test_shamir_any_threshold_shares_rebuild_fewer_do_not(threshold, num):
    secret = bytes(range(40))  # longer than one 16-byte chunk
    shares = split_secret(secret, threshold, num)
    rng = np.random.default_rng(threshold)
    for _ in range(3):
        chosen = [shares[i] for i in rng.choice(num, threshold, replace=False)]
        assert combine_shares(chosen, threshold) == secret
    with pytest.raises(ShamirError):
        combine_shares(shares[: threshold - 1], threshold)
    corrupted = shares[: threshold - 1] + [shares[-1][:2] + bytes(len(shares[0]) - 2)]
    try:
        rebuilt = combine_shares(corrupted, threshold)
    except ShamirError:
        rebuilt = None
    assert rebuilt != secret


def test_pairwise_masks_cancel_in_the_sum_and_hide_each_input():
    rng = np.random.default_rng(0)
    num_clients, length, clip = 6, 5000, 1.0
    levels = levels_for(BITS, num_clients)
    updates = rng.normal(0, 0.3, size=(num_clients, length))
    keys = [generate_key_pair() for _ in range(num_clients)]
    masked = []
    for i in range(num_clients):
        vector = quantize(updates[i], clip, levels, rng)
        for j in range(num_clients):
            if i == j:
                continue
            mask = expand_mask(derive_shared_key(keys[i].private, keys[j].public_bytes, b"mask"), length, BITS)
            vector = add_mod(vector, mask, BITS) if i < j else sub_mod(vector, mask, BITS)
        masked.append(vector)
    total = masked[0]
    for vector in masked[1:]:
        total = add_mod(total, vector, BITS)
    recovered = dequantize_sum(total, num_clients, clip, levels)
    step = 2 * clip / levels
    assert np.max(np.abs(recovered - np.clip(updates, -clip, clip).sum(axis=0))) <= num_clients * step
    # one client's masked vector says nothing about its update: uncorrelated and uniform
    assert abs(np.corrcoef(masked[0].astype(np.float64), updates[0])[0, 1]) < 0.05
    counts, _ = np.histogram(masked[0].astype(np.float64), bins=16, range=(0, 2**BITS))
    expected = length / 16
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 37.7  # 99.9th percentile of chi-square with 15 degrees of freedom


def test_mask_expansion_is_deterministic_per_key_and_in_range():
    key = bytes(range(32))
    first, again = expand_mask(key, 1000, 20), expand_mask(key, 1000, 20)
    assert np.array_equal(first, again)
    assert first.max() < 2**20
    assert not np.array_equal(first, expand_mask(bytes(32), 1000, 20))


def test_quantization_is_unbiased_and_checked():
    rng = np.random.default_rng(1)
    levels = levels_for(16, 10)
    values = np.full(20000, 0.123)
    q = quantize(values, 1.0, levels, rng)
    assert abs(dequantize_sum(q, 1, 1.0, levels).mean() - 0.123) < 1e-4
    clipped = dequantize_sum(quantize(np.array([5.0, -5.0]), 1.0, levels, rng), 1, 1.0, levels)
    assert clipped == pytest.approx([1.0, -1.0])
    with pytest.raises(QuantizationError, match="fewer than 2 levels"):
        levels_for(4, 100)
    with pytest.raises(QuantizationError):
        expand_mask(bytes(32), 10, 70)
