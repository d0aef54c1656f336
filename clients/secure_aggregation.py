"""Client side of SecAgg+: a mod around the train handler plus the protocol-stage handler.

The mod lets local training run unchanged, then keeps the reply's model update on the
client (quantized, in Context.state) and sends only public keys and metrics. The stage
handler (message type ``train.secagg``) then runs the share, mask and unmask stages;
the masked update is the only form in which the update ever leaves the client.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from clients import protocol
from conf.schema import cached_config_from_yaml
from privacy.secagg.masking import levels_for, quantize
from privacy.secagg.protocol import ClientSession, SecAggParams

logger = logging.getLogger(__name__)

SESSION_STATE_KEY = "fedguard.secagg-session"
INPUT_STATE_KEY = "fedguard.secagg-input"
INPUT_ARRAY = "input"


def params_from(cfg) -> SecAggParams:
    sa = cfg.secure_agg
    return SecAggParams(modulus_bits=int(sa.modulus_bits), neighbours=int(sa.neighbours), threshold=int(sa.threshold))


def flatten_update(new: ArrayRecord, old: ArrayRecord) -> np.ndarray:
    """new - old, flattened in the ArrayRecord's key order (the server unflattens in the same order)."""
    if list(new.keys()) != list(old.keys()):
        raise ValueError("the trained model's arrays differ from the global model's")
    return np.concatenate(
        [(new[key].numpy().astype(np.float64) - old[key].numpy().astype(np.float64)).ravel() for key in old.keys()]
    )


def encode_weighted_update(update: np.ndarray, weight: float, cfg) -> np.ndarray:
    """Quantize [weight x clipped update, weight] so the server can form a weighted mean from sums."""
    sa = cfg.secure_agg
    if not np.all(np.isfinite(update)):
        raise ValueError("the model update holds NaN or infinite values; not sending it into the aggregate")
    if not 0 < weight <= sa.max_weight:
        raise ValueError(f"example count {weight} is outside (0, secure_agg.max_weight={sa.max_weight}]")
    levels = levels_for(int(sa.modulus_bits), int(cfg.simulation.num_clients))
    rng = np.random.default_rng()  # OS entropy: rounding noise must not be predictable
    weighted = np.clip(update, -sa.clip_range, sa.clip_range) * weight
    body = quantize(weighted, sa.clip_range * sa.max_weight, levels, rng)
    tail = quantize(np.array([float(weight)]), float(sa.max_weight), levels, rng)
    return np.concatenate([body, tail])


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Train as usual, then hold the update back and advertise SecAgg+ keys instead."""
    reply = call_next(msg, context)
    cfg = cached_config_from_yaml(str(msg.content[protocol.CONFIG_KEY][protocol.FEDGUARD_CONFIG_KEY]))
    if cfg.secure_agg.mode == "off" or reply.has_error() or protocol.ARRAYS_KEY not in reply.content:
        return reply  # plain runs, errors and budget refusals pass through unchanged
    update = flatten_update(reply.content[protocol.ARRAYS_KEY], msg.content[protocol.ARRAYS_KEY])
    weight = float(reply.content[protocol.METRICS_KEY][protocol.NUM_EXAMPLES_KEY])
    encoded = encode_weighted_update(update, weight, cfg)
    server_round = int(msg.content[protocol.CONFIG_KEY].get(protocol.SERVER_ROUND_KEY, 0))
    session = ClientSession(context.node_id, params_from(cfg), server_round)
    envelope_public, mask_public = session.advertise()
    context.state[SESSION_STATE_KEY] = session.to_record()
    context.state[INPUT_STATE_KEY] = ArrayRecord({INPUT_ARRAY: Array(encoded)})
    content = RecordDict(
        {
            protocol.METRICS_KEY: reply.content[protocol.METRICS_KEY],
            protocol.SECAGG_KEY: ConfigRecord({"stage": "advertise", "envelope_key": envelope_public, "mask_key": mask_public}),
        }
    )
    if protocol.PRIVACY_KEY in reply.content:
        content[protocol.PRIVACY_KEY] = reply.content[protocol.PRIVACY_KEY]
    return Message(content, reply_to=msg)


def handle_stage(msg: Message, context: Context) -> Message:
    """Stages 1-3 of SecAgg+ for this client; its session lives in Context.state between them."""
    request = msg.content[protocol.SECAGG_KEY]
    stage = str(request["stage"])
    session = ClientSession.from_record(context.state[SESSION_STATE_KEY])
    if stage == "share":
        keys = {
            int(p): (bytes(e), bytes(m))
            for p, e, m in zip(request["peers"], request["envelope_keys"], request["mask_keys"], strict=True)
        }
        sealed = session.share(keys)
        answer = ConfigRecord({"to": list(sealed), "ciphertexts": list(sealed.values())})
    elif stage == "mask":
        received = {int(s): bytes(c) for s, c in zip(request["from"], request["ciphertexts"], strict=True)}
        encoded = context.state[INPUT_STATE_KEY][INPUT_ARRAY].numpy()
        masked = session.mask(received, encoded)
        del context.state[INPUT_STATE_KEY]  # the clear input is no longer needed
        context.state[SESSION_STATE_KEY] = session.to_record()
        reply = RecordDict({protocol.SECAGG_KEY: ArrayRecord({"masked": Array(masked)})})
        return Message(reply, reply_to=msg)
    elif stage == "unmask":
        revealed = session.unmask({int(n) for n in request["survivors"]}, {int(n) for n in request["dropped"]})
        answer = ConfigRecord(
            {
                "for": list(revealed),
                "kinds": [kind for kind, _ in revealed.values()],
                "shares": [share for _, share in revealed.values()],
            }
        )
        del context.state[SESSION_STATE_KEY]  # the round is over for this client
        return Message(RecordDict({protocol.SECAGG_KEY: answer}), reply_to=msg)
    else:
        raise ValueError(f"unknown secure aggregation stage {stage!r}")
    context.state[SESSION_STATE_KEY] = session.to_record()
    return Message(RecordDict({protocol.SECAGG_KEY: answer}), reply_to=msg)
