"""The ClientApp's optional train layers, chosen once per run from the run's config.

Flower builds a ClientApp's mods at import time, before any run config exists, so the
layers cannot be picked there. This one mod reads the run's config from the first train
message, picks the layers that run uses (SecAgg+ outside, client-level DP inside it, so
SecAgg+ masks the clipped update), caches that choice per config, and applies exactly
those: a run without a layer never enters its code.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedguard.clients.client_dp import client_dp_mod
from fedguard.clients.secure_aggregation import secure_aggregation_mod
from fedguard.clients.wire import protocol
from fedguard.clients.wire.checks import parse_run_config, require_record, text
from fedguard.conf.plans import client_level_dp


@lru_cache(maxsize=8)
def train_layers(config_text: str) -> tuple[Mod, ...]:
    """The mods a run with this config installs around training, outermost first
    (MalformedMessage for a config that does not parse: the request checks answer it)."""
    cfg = parse_run_config(config_text)
    layers: list[Mod] = []
    if cfg.secure_agg.mode == "secaggplus":
        layers.append(secure_aggregation_mod)
    if client_level_dp(cfg):
        layers.append(client_dp_mod)
    return tuple(layers)


def _chain(layers: tuple[Mod, ...], handler: ClientAppCallable) -> ClientAppCallable:
    for layer in reversed(layers):
        handler = (lambda inner, mod: lambda msg, context: mod(msg, context, inner))(handler, layer)
    return handler


def run_layers(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply this run's train layers. A request whose config cannot be read is refused here
    with the same MalformedMessage the train handler would raise (refuse_bad_requests, the
    outer mod, turns it into an error reply)."""
    config = require_record(msg.content, protocol.CONFIG_KEY, ConfigRecord)
    config_text = text(config, protocol.FEDGUARD_CONFIG_KEY)
    return _chain(train_layers(config_text), call_next)(msg, context)
