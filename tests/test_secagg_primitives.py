"""SecAgg+ building blocks: key agreement, share envelopes, Shamir, masks, quantization."""

from __future__ import annotations

import numpy as np
import pytest

from fedguard.privacy.secagg.envelope import ShareAuthenticationError, open_sealed, seal
from fedguard.privacy.secagg.keys import derive_shared_key, generate_key_pair, private_key_bytes, private_key_from_bytes
from fedguard.privacy.secagg.masking import (
    QuantizationError,
    add_mod,
    dequantize_sum,
    expand_mask,
    levels_for,
    quantize,
    sub_mod,
)
from fedguard.privacy.secagg.shamir import ShamirError, combine_shares, split_secret

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


def _reference_mask(key: bytes, length: int, bits: int) -> np.ndarray:
    """The mask straight from one ChaCha20 keystream call, as the first implementation had it."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor().update(bytes(8 * length))
    return np.frombuffer(stream, dtype=np.uint64) & np.uint64((1 << bits) - 1)


@pytest.mark.parametrize("bits", [20, 48, 62])
def test_in_place_masking_equals_separate_masks_across_chunks(monkeypatch, bits):
    import fedguard.privacy.secagg.masking as masking
    monkeypatch.setattr(masking, "CHUNK_WORDS", 7)  # many chunks and a ragged last one
    length, modulus = 23, np.uint64((1 << bits) - 1)
    rng = np.random.default_rng(bits)
    start = rng.integers(0, 1 << bits, length, dtype=np.uint64)
    keys = [bytes([i]) * 32 for i in range(4)]
    signs = [masking.ADD, masking.SUBTRACT, masking.ADD, masking.SUBTRACT]
    expected = start.copy()
    for key, sign in zip(keys, signs):
        mask = _reference_mask(key, length, bits)
        expected = (expected + mask) & modulus if sign == masking.ADD else (expected - mask) & modulus
    total = start.copy()
    assert masking.apply_masks(total, list(zip(keys, signs)), bits) is total
    assert np.array_equal(total, expected)
    assert np.array_equal(expand_mask(keys[0], length, bits), _reference_mask(keys[0], length, bits))
    # adding and removing the same masks restores the input exactly
    masking.apply_masks(total, [(k, -s) for k, s in zip(keys, signs)], bits)
    assert np.array_equal(total, start)


def test_apply_masks_refuses_what_it_cannot_mask_in_place():
    from fedguard.privacy.secagg.masking import ADD, apply_masks

    with pytest.raises(ValueError, match="uint64"):
        apply_masks(np.zeros(4, dtype=np.int64), [(bytes(32), ADD)], BITS)
    with pytest.raises(ValueError, match="uint64"):
        apply_masks(np.zeros(4, dtype=np.uint64)[::2], [(bytes(32), ADD)], BITS)
    with pytest.raises(ValueError, match="sign"):
        apply_masks(np.zeros(4, dtype=np.uint64), [(bytes(32), 2)], BITS)


def test_chunked_quantization_fills_out_and_stays_unbiased(monkeypatch):
    import fedguard.privacy.secagg.masking as masking
    monkeypatch.setattr(masking, "QUANTIZE_CHUNK", 1000)
    rng = np.random.default_rng(5)
    levels = levels_for(24, 10)
    values = np.linspace(-2.0, 2.0, 30001).astype(np.float32)  # float32 input, ragged last chunk
    out = np.empty(values.size + 1, dtype=np.uint64)
    returned = quantize(values, 1.0, levels, rng, out=out[:-1])
    assert returned.base is out
    q = out[:-1]
    assert q.max() <= levels
    recovered = dequantize_sum(q, 1, 1.0, levels)
    step = 2.0 / levels
    assert np.all(np.abs(recovered - np.clip(values, -1.0, 1.0)) <= step + 1e-6)
    constant = quantize(np.full(40000, 0.3 + step / 4), 1.0, levels, rng)  # a quarter step above a level
    assert set(np.unique(constant).tolist()) <= {int((0.3 + 1.0) / step), int((0.3 + 1.0) / step) + 1}
    assert abs(dequantize_sum(constant, 1, 1.0, levels).mean() - (0.3 + step / 4)) < step / 20
    with pytest.raises(ValueError, match="uint64"):
        quantize(values, 1.0, levels, rng, out=np.empty(values.size, dtype=np.int64))


@pytest.mark.parametrize("length", [1, 16, 17, 32, 33])
def test_shamir_pads_to_whole_chunks_only(length):
    secret = bytes(range(1, length + 1))
    shares = split_secret(secret, 3, 5)
    chunks = -(-length // 16)
    assert {len(share) for share in shares} == {3 + 16 * chunks}  # index + pad count + chunks
    assert combine_shares(shares[1:4], 3) == secret
    tampered = [shares[0], shares[1], shares[2][:2] + bytes([(shares[2][2] + 1) % 16]) + shares[2][3:]]
    with pytest.raises(ShamirError, match="length"):
        combine_shares(tampered, 3)
    with pytest.raises(ShamirError, match="empty"):
        split_secret(b"", 2, 3)
