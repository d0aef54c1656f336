"""Federated standardization statistics as plain numbers: bounded per-record sums, their
sensitivity, the Gaussian noise a site adds, and the server's turn from sums to means.

Why bounded sums: a site's raw mean and variance have no finite sensitivity (one record can
move them arbitrarily), so nothing calibrated could be added. Each numeric feature is
clipped to the range the data contract declares, ``[low, high]``, and mapped to
``u = (x - mid) / half`` in ``[-1, 1]``. A record then adds to its site's vector

    (1, u_1 .. u_d, s_1 .. s_d, one-hot of each categorical feature whose frequencies are asked)

where ``s_j`` is its second moment of feature ``j`` in the same units (``u_j**2`` for a table
column, the mean over pixels of the normalised squared pixel for an image), clipped to
``[0, 1]``. Adding or removing one record moves the vector by at most
``sqrt(1 + 2 d + k)`` in L2 (``k``: categorical features counted), whatever the data.

The release is one Gaussian mechanism with std ``noise_multiplier x sensitivity`` on every
coordinate: its Rényi DP is exactly that of one DP-SGD step at sampling rate 1 with the same
noise multiplier, so it enters a site's accountant as the history entry ``(z, 1.0, 1)`` and
composes with training under the same accountant.

The server adds the sites' vectors (they are sums; adding them is the pooled sum) and turns
the total into means, variances and frequencies with :func:`statistics_from_sums`. Without
noise the result is the pooled data's statistics (of the clipped values) exactly, up to
float round-off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedguard.privacy.randomness import os_generator
from fedguard.privacy.secagg.masking import dequantize_sum, quantize
from fedguard.privacy.secure_noise import SecureGaussian

# The history entry of one release: sampling rate 1 (every record is in it), one step.
RELEASE_SAMPLE_RATE = 1.0
RELEASE_STEPS = 1
# A standard deviation is never reported below this fraction of the declared half-range (post-
# processing, data-independent): under noise a small site's second moment can fall under its squared
# mean, and standardising by a near-zero std would blow the inputs up; 1/20 caps them at 40.
MIN_STD_FRACTION = 0.05


class PreprocessingError(ValueError):
    """Statistics that cannot be computed or released as asked; the message says why."""


@dataclass(frozen=True)
class FeatureRange:
    """The declared range ``[low, high]`` of one numeric quantity (a column, or an image's pixels)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high <= self.low:
            raise PreprocessingError(f"a declared range needs finite low < high; got [{self.low}, {self.high}]")

    @property
    def mid(self) -> float:
        return (self.low + self.high) / 2.0

    @property
    def half(self) -> float:
        return (self.high - self.low) / 2.0


@dataclass(frozen=True)
class SumsLayout:
    """Where each part sits in a sums vector: the count, ``numeric`` first and second moments,
    then one block per categorical feature with the sizes in ``category_counts``."""

    numeric: int
    category_counts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.numeric < 0 or any(c < 1 for c in self.category_counts):
            raise PreprocessingError(f"layout needs numeric >= 0 and every category block >= 1; got {self}")
        if self.numeric == 0 and not self.category_counts:
            raise PreprocessingError("no numeric or categorical statistics asked for")

    @property
    def length(self) -> int:
        return 1 + 2 * self.numeric + sum(self.category_counts)


def l2_sensitivity(layout: SumsLayout) -> float:
    """How far one record can move the sums vector in L2: ``sqrt(1 + 2 d + k)``."""
    return math.sqrt(1 + 2 * layout.numeric + len(layout.category_counts))


def noise_std(noise_multiplier: float, layout: SumsLayout) -> float:
    """The Gaussian noise std on every coordinate of the vector: ``z x sensitivity``."""
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise PreprocessingError(f"noise multiplier {noise_multiplier} must be finite and >= 0")
    return noise_multiplier * l2_sensitivity(layout)


def normalised(values: np.ndarray, ranges: Sequence[FeatureRange]) -> np.ndarray:
    """``(clip(x, low, high) - mid) / half`` per column: every value in ``[-1, 1]``."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(ranges):
        raise PreprocessingError(f"expected an n x {len(ranges)} array of values; got shape {values.shape}")
    low = np.array([r.low for r in ranges])
    high = np.array([r.high for r in ranges])
    mid = np.array([r.mid for r in ranges])
    half = np.array([r.half for r in ranges])
    return (np.clip(values, low, high) - mid) / half


def bounded_sums(
    first: np.ndarray, second: np.ndarray, codes: Sequence[np.ndarray], layout: SumsLayout
) -> np.ndarray:
    """One site's sums vector from its records' normalised first moments (n x d, clipped to
    [-1, 1]), second moments (n x d, clipped to [0, 1]) and category indices (one array per
    counted categorical feature)."""
    first = np.clip(np.asarray(first, dtype=np.float64), -1.0, 1.0)
    second = np.clip(np.asarray(second, dtype=np.float64), 0.0, 1.0)
    rows = len(first)
    if first.shape != (rows, layout.numeric) or second.shape != first.shape or len(codes) != len(layout.category_counts):
        raise PreprocessingError(f"records do not match the layout {layout}: first {first.shape}, second "
                                 f"{second.shape}, {len(codes)} categorical feature(s)")
    parts = [np.array([float(rows)]), first.sum(axis=0), second.sum(axis=0)]
    for block, size in zip(codes, layout.category_counts):
        block = np.asarray(block, dtype=np.int64)
        if len(block) != rows or (len(block) and (block.min() < 0 or block.max() >= size)):
            raise PreprocessingError(f"category indices must be one per record, in 0..{size - 1}")
        parts.append(np.bincount(block, minlength=size).astype(np.float64))
    return np.concatenate(parts)


def add_noise(sums: np.ndarray, std: float, secure: bool = False) -> np.ndarray:
    """``sums`` plus N(0, std^2) on every coordinate, drawn from OS randomness (never a seed);
    with ``secure`` (``privacy.secure_noise``), from the same CSPRNG as DP-SGD's noise."""
    sums = np.asarray(sums, dtype=np.float64)
    if std == 0:
        return sums.copy()
    if secure:
        reference = torch.zeros(sums.shape, dtype=torch.float64)
        return sums + SecureGaussian().gaussian(float(std), reference).numpy()
    noise = torch.normal(0.0, float(std), size=sums.shape, generator=os_generator(), dtype=torch.float64)
    return sums + noise.numpy()


@dataclass(frozen=True)
class Statistics:
    """What the server makes of the summed vector, in the data's own units."""

    count: float
    means: tuple[float, ...]
    variances: tuple[float, ...]
    frequencies: tuple[tuple[float, ...], ...]

    @property
    def stds(self) -> tuple[float, ...]:
        return tuple(math.sqrt(v) for v in self.variances)


def statistics_from_sums(total: np.ndarray, layout: SumsLayout, ranges: Sequence[FeatureRange]) -> Statistics:
    """Means, variances and category frequencies from a (possibly noisy) summed vector.

    Noise can push the count under 1, a mean outside its range or a second moment under the
    squared mean; each is projected back to what clipped data could give (count >= 1, mean
    within the range, std between ``MIN_STD_FRACTION`` x half-range and the half-range,
    frequencies non-negative and summing to 1). Without noise no projection is active."""
    total = np.asarray(total, dtype=np.float64)
    if total.shape != (layout.length,) or not np.all(np.isfinite(total)):
        raise PreprocessingError(f"a sums vector of {layout.length} finite numbers was expected; got {total.shape}")
    if len(ranges) != layout.numeric:
        raise PreprocessingError(f"{len(ranges)} range(s) for {layout.numeric} numeric feature(s)")
    count = max(float(total[0]), 1.0)
    d = layout.numeric
    mean_u = np.clip(total[1:1 + d] / count, -1.0, 1.0)
    second_u = np.clip(total[1 + d:1 + 2 * d] / count, 0.0, 1.0)
    var_u = np.clip(second_u - mean_u**2, MIN_STD_FRACTION**2, 1.0)
    means = tuple(float(r.mid + r.half * m) for r, m in zip(ranges, mean_u))
    variances = tuple(float(r.half**2 * v) for r, v in zip(ranges, var_u))
    frequencies, at = [], 1 + 2 * d
    for size in layout.category_counts:
        block = np.clip(total[at:at + size], 0.0, None)
        at += size
        frequencies.append(tuple(float(f) for f in (block / block.sum() if block.sum() > 0 else np.full(size, 1 / size))))
    return Statistics(float(total[0]), means, variances, tuple(frequencies))


# Under SecAgg+, a released vector is clipped to [-R, R] per coordinate before it is quantised,
# R = max_rows + STATISTICS_NOISE_MARGIN x noise std: every exact coordinate lies in [-max_rows,
# max_rows] (a count, or a sum of values in [-1, 1]), and Gaussian noise beyond 10 std happens
# with probability ~1e-23 per coordinate. The clip is post-processing of the noisy release, so it
# changes no privacy figure; it only bounds what the fixed-point encoding has to carry.
STATISTICS_NOISE_MARGIN = 10.0


def statistics_bound(max_rows: float, std: float) -> float:
    """The per-coordinate range ``R`` of a site's released vector under secure aggregation."""
    if not (math.isfinite(max_rows) and max_rows >= 1) or not (math.isfinite(std) and std >= 0):
        raise PreprocessingError(f"the statistics range needs max_rows >= 1 and std >= 0; got {max_rows}, {std}")
    return float(max_rows) + STATISTICS_NOISE_MARGIN * float(std)


def encode_statistics(released: np.ndarray, bound: float, levels: int) -> np.ndarray:
    """A released vector as SecAgg+ integers: clipped to ``[-bound, bound]``, stochastic rounding
    (OS randomness) to ``levels`` steps; the sum of such vectors decodes with :func:`decode_statistics`."""
    released = np.asarray(released, dtype=np.float64)
    if not np.all(np.isfinite(released)):
        raise PreprocessingError("the statistics vector holds NaN or infinite values")
    return quantize(released, bound, levels, np.random.default_rng())


def decode_statistics(total: np.ndarray, sites: int, bound: float, levels: int) -> np.ndarray:
    """The float sum of ``sites`` vectors from the unmasked integer sum of their encodings.

    Each coordinate is off by at most ``sites x 2 bound / levels`` (one rounding step per site)."""
    return dequantize_sum(np.asarray(total, dtype=np.uint64), sites, bound, levels)
