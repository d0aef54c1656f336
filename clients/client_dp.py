"""Client side of client-level DP (DP-FedAvg): clip the model update, weigh it uniformly,
and under ``privacy.noise=distributed`` add this client's share N(0, σ²C²/n) of the noise.

A mod around the train handler, inside the secure-aggregation mod, so that SecAgg+
masks the clipped update and sample-level DP-SGD (which runs in the handler) composes
unchanged. The config is read from each message, never at import time.

Why uniform weights: DP-FedAvg bounds how much one client can move the *sum* of updates
(its L2 sensitivity is the clip norm C). Weighting by example counts would let a large
client move the sum by more than C, and the counts themselves (sent in the clear in the
metrics) reveal each client's data size. So the reply's ``num-examples`` becomes 1.

Distributed noise: σ comes from the config itself (privacy/client_dp_accounting.py
calibrates it deterministically), not from a number the server sends, so a server cannot
talk clients into adding less noise.
"""

from __future__ import annotations

import logging
import secrets

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.app import Context
from flwr.clientapp.typing import ClientAppCallable

from clients import protocol
from clients.secure_aggregation import array_view, flatten_update
from conf.schema import cached_config_from_yaml, client_level_dp
from privacy.client_dp_accounting import noise_share_std

logger = logging.getLogger(__name__)

# Every client counts once in the sum (see the module docstring).
UNIFORM_WEIGHT = 1
# Re-clipping passes: storing old + scaled update in float32 rounds each coordinate, which
# can push the update the server recomputes a hair over C; each pass shrinks by the excess.
MAX_CLIP_PASSES = 8
# Shrink a little more than the measured excess so that round-off cannot undo it.
CLIP_SAFETY = 1.0 - 1e-6


class ClipError(ValueError):
    """An update that could not be brought within the clip norm (non-finite values)."""


def update_norm(new: ArrayRecord, old: ArrayRecord) -> float:
    """L2 norm of new - old, computed the way the server recomputes it (float64 of stored values)."""
    return float(np.linalg.norm(flatten_update(new, old)))


def _apply(old: ArrayRecord, update: np.ndarray, scale: float) -> ArrayRecord:
    arrays, offset = {}, 0
    for key in old.keys():
        base = array_view(old[key])
        part = update[offset : offset + base.size].reshape(base.shape)
        arrays[key] = Array((base.astype(np.float64) + scale * part).astype(base.dtype))
        offset += base.size
    return ArrayRecord(arrays)


def clip_arrays(new: ArrayRecord, old: ArrayRecord, clip_norm: float) -> tuple[ArrayRecord, float]:
    """Arrays old + u·min(1, C/‖u‖) (u = new − old) whose *stored* update has norm ≤ C.

    Returns the clipped arrays and the norm of the update before clipping.
    """
    update = flatten_update(new, old)
    if not np.all(np.isfinite(update)):
        raise ClipError("the model update holds NaN or infinite values")
    norm = float(np.linalg.norm(update))
    if norm <= clip_norm:
        return new, norm
    scale = clip_norm / norm
    for _ in range(MAX_CLIP_PASSES):
        clipped = _apply(old, update, scale)
        stored = update_norm(clipped, old)
        if stored <= clip_norm:
            return clipped, norm
        scale *= clip_norm / stored * CLIP_SAFETY
    raise ClipError(f"could not bring an update of norm {norm:g} within clip norm {clip_norm:g}")


def add_noise_share(new: ArrayRecord, old: ArrayRecord, std: float, rng: np.random.Generator) -> ArrayRecord:
    """old + (new - old) + N(0, std²) per coordinate: this client's share of distributed noise."""
    update = flatten_update(new, old)
    return _apply(old, update + rng.normal(0.0, std, size=update.shape), 1.0)


def client_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Train as usual, then clip the reply's update to ``privacy.client_clip_norm`` and weigh it 1."""
    reply = call_next(msg, context)
    cfg = cached_config_from_yaml(str(msg.content[protocol.CONFIG_KEY][protocol.FEDGUARD_CONFIG_KEY]))
    if not client_level_dp(cfg) or reply.has_error() or protocol.ARRAYS_KEY not in reply.content:
        return reply  # no client-level DP, errors and budget refusals pass through unchanged
    clip_norm = float(cfg.privacy.client_clip_norm)
    clipped, norm = clip_arrays(reply.content[protocol.ARRAYS_KEY], msg.content[protocol.ARRAYS_KEY], clip_norm)
    logger.debug("client-level DP: update norm %.4g clipped to %.4g", norm, min(norm, clip_norm))
    if cfg.privacy.noise == "distributed":  # OS entropy: a share anyone could regenerate protects nothing
        clipped = add_noise_share(clipped, msg.content[protocol.ARRAYS_KEY], noise_share_std(cfg), _noise_rng())
    reply.content[protocol.ARRAYS_KEY] = clipped
    metrics = dict(reply.content[protocol.METRICS_KEY])
    metrics[protocol.NUM_EXAMPLES_KEY] = UNIFORM_WEIGHT
    reply.content[protocol.METRICS_KEY] = MetricRecord(metrics)
    return reply


def _noise_rng() -> np.random.Generator:
    return np.random.default_rng(secrets.randbits(128))
