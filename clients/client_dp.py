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

Adaptive clipping (privacy/adaptive_clipping.py): the round's C comes from the server (it
is post-processing of released counts), checked in :func:`round_clip_norm` before training;
σ_Δ and σ_b still come from the config. The client adds its centred clip indicator b − ½
(plus its share N(0, σ_b²/n) under distributed noise) as the ``clip-indicator`` record: in
the clear to a server that adds central noise, or, under SecAgg+, appended by the
secure-aggregation mod to the masked vector, so the server only ever sees the noisy sum.
"""

from __future__ import annotations

import logging
import math
import secrets

import numpy as np
from fedguard.clients.wire import protocol
from fedguard.clients.wire.arrays import array_view, flatten_update
from fedguard.clients.wire.checks import MalformedMessage, finite_number
from fedguard.conf.plans import adaptive_clip_rule, client_dp_plan, uses_adaptive_clipping
from fedguard.conf.run_config import cached_config_from_yaml
from fedguard.privacy.adaptive_clipping import clip_indicator, round_clip_norm_problem
from fedguard.privacy.client_dp_noise import count_share_std, noise_share_std
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from omegaconf import DictConfig

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


def round_clip_norm(cfg: DictConfig, config: ConfigRecord, server_round: int) -> float:
    """The clip norm C of this round: the server's under adaptive clipping (checked; raises
    MalformedMessage), else ``privacy.client_clip_norm``."""
    if not uses_adaptive_clipping(cfg):
        return float(cfg.privacy.client_clip_norm)
    value = float(finite_number(config, protocol.CLIENT_CLIP_NORM_KEY, 0.0, math.inf))
    if (problem := round_clip_norm_problem(adaptive_clip_rule(cfg), value, server_round)) is not None:
        raise MalformedMessage(f"'{protocol.CLIENT_CLIP_NORM_KEY}': {problem}")
    return value


def client_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Train as usual, then clip the reply's update to the round's C and weigh it 1; under
    adaptive clipping add the clip indicator (see the module docstring). Installed only for
    runs with client-level DP (clients/layers.py)."""
    reply = call_next(msg, context)
    config = msg.content[protocol.CONFIG_KEY]
    cfg = cached_config_from_yaml(str(config[protocol.FEDGUARD_CONFIG_KEY]))
    if reply.has_error() or protocol.ARRAYS_KEY not in reply.content:
        return reply  # errors and budget refusals pass through unchanged
    # The train handler has already checked the server's C (before training); this cannot fail now.
    clip_norm = round_clip_norm(cfg, config, int(config.get(protocol.SERVER_ROUND_KEY, 0)))
    old = msg.content[protocol.ARRAYS_KEY]
    clipped, norm = clip_arrays(reply.content[protocol.ARRAYS_KEY], old, clip_norm)
    logger.debug("client-level DP: update norm %.4g clipped to %.4g", norm, min(norm, clip_norm))
    distributed = cfg.privacy.noise == "distributed"
    rng = _noise_rng() if distributed else None  # OS entropy: a share anyone could regenerate protects nothing
    if rng is not None:
        clipped = add_noise_share(clipped, old, noise_share_std(client_dp_plan(cfg), clip_norm), rng)
    reply.content[protocol.ARRAYS_KEY] = clipped
    if uses_adaptive_clipping(cfg):
        indicator = clip_indicator(norm, clip_norm)
        if rng is not None:
            indicator += float(rng.normal(0.0, count_share_std(client_dp_plan(cfg))))
        reply.content[protocol.CLIP_INDICATOR_KEY] = ConfigRecord({protocol.CLIP_INDICATOR_FIELD: indicator})
    metrics = dict(reply.content[protocol.METRICS_KEY])
    metrics[protocol.NUM_EXAMPLES_KEY] = UNIFORM_WEIGHT
    reply.content[protocol.METRICS_KEY] = MetricRecord(metrics)
    return reply


def _noise_rng() -> np.random.Generator:
    return np.random.default_rng(secrets.randbits(128))
