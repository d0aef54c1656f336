"""A hostile SecAgg+ server, written here, driving fedguard's real clients in-process.

Each site is fedguard's real client code: the secure-aggregation mod around a stand-in
for local training (stage 0), then the real ClientApp's stage handler with its request
checks (stages 1-3), each with its own Context. The server side is the test's: it sends
whatever requests an attack needs and tries to rebuild a target's input from what the
clients answer, with fedguard's own Shamir and mask code.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedguard.clients.app import app as client_app
from fedguard.clients.datasets import load_dataset
from fedguard.clients.models import build_model
from fedguard.clients.secagg_identity import provision_rosters
from fedguard.clients.secure_aggregation import secure_aggregation_mod
from fedguard.clients.wire import protocol
from fedguard.conf.run_config import config_to_yaml
from fedguard.privacy.secagg.envelope import open_sealed, seal
from fedguard.privacy.secagg.keys import derive_shared_key, generate_key_pair, private_key_from_bytes
from fedguard.privacy.secagg.masking import ADD, SUBTRACT, apply_masks, dequantize_sum, levels_for
from fedguard.privacy.secagg.protocol import MASK_PURPOSE, SHARE_PURPOSE
from fedguard.privacy.secagg.shamir import combine_shares, split_secret

EXAMPLES = 30
ADVERT_FIELDS = ("envelope_key", "mask_key", "identity_key", "signature", "seed_commitment", "nonce_commitment")
STEP_UNIT = 0.01
# Sites that assume no colluders (secagg-collusion-fraction 0). By default a site assumes
# ceil(5% of its roster), at least one, and then refuses 4 sites with k=3, t=2 (2t <= k + c);
# tests of attacks that need no colluder (key substitution, withheld shares, replays) keep that
# small, fast setup with this setting instead.
NO_COLLUDERS = {"secagg-collusion-fraction": 0}


def step(node: int) -> float:
    """Site ``node``'s update on every coordinate (distinct per site, so a rebuilt input names its owner)."""
    return STEP_UNIT * (node % 7 + 1)


def _local_training(msg: Message, context: Context) -> Message:
    arrays = msg.content[protocol.ARRAYS_KEY]
    trained = ArrayRecord({k: Array(arrays[k].numpy() + np.float32(step(context.node_id))) for k in arrays.keys()})
    metrics = MetricRecord({protocol.NUM_EXAMPLES_KEY: EXAMPLES, protocol.TRAIN_LOSS_KEY: 0.5, protocol.TRAIN_STEPS_KEY: 1})
    return Message(RecordDict({protocol.ARRAYS_KEY: trained, protocol.METRICS_KEY: metrics}), reply_to=msg)


@dataclass
class HostileServer:
    """Sends the requests a test chooses to real fedguard clients and keeps their answers."""

    cfg: object
    nodes: tuple[int, ...]
    root: Path  # the sites' state dirs live under it (identity keys, the roster they pinned)
    server_round: int = 1
    session_id: bytes = b"session-0000001"
    node_configs: dict[int, dict] = field(default_factory=dict)
    # Node-config keys every site gets (before its own ``node_configs``), e.g. ``NO_COLLUDERS``.
    site_settings: dict = field(default_factory=dict)
    contexts: dict[int, Context] = field(default_factory=dict)
    advertised: dict[int, ConfigRecord] = field(default_factory=dict)
    # Each masking site's signed mask-partner list (what the server relays at unmask; it cannot forge one).
    partner_statements: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    nonces: dict[int, bytes] = field(default_factory=dict)  # graph nonces the sites revealed
    # Each site's signature on the digest of the cohort list it fixed (forwarded at the share stage).
    cohort_signatures: dict[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bundle = load_dataset(self.cfg.dataset, self.cfg.seed)
        self.arrays = ArrayRecord(build_model(self.cfg.model, bundle.input_shape, bundle.num_classes).state_dict())
        self.length = 1 + sum(int(np.prod(self.arrays[k].shape)) for k in self.arrays.keys())
        self.state_dirs = {node: self.root / f"site-{node}" for node in self.nodes}
        self.roster = provision_rosters({f"site-{node}": d for node, d in self.state_dirs.items()})
        for index, node in enumerate(self.nodes):
            config = {"partition-id": index, "num-partitions": len(self.nodes), "state-dir": str(self.state_dirs[node]),
                      **self.site_settings, **self.node_configs.get(node, {})}
            self.contexts[node] = Context(run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config={})

    def train(self, node: int, cfg=None) -> Message:
        """Stage 0: the train request; the reply advertises the site's keys (or refuses)."""
        config = ConfigRecord({protocol.FEDGUARD_CONFIG_KEY: config_to_yaml(cfg or self.cfg),
                               protocol.SERVER_ROUND_KEY: self.server_round,
                               protocol.SECAGG_SESSION_KEY: self.session_id})
        message = Message(RecordDict({protocol.ARRAYS_KEY: self.arrays, protocol.CONFIG_KEY: config}),
                          dst_node_id=node, message_type="train")
        message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        reply = secure_aggregation_mod(message, self.contexts[node], _local_training)
        if not reply.has_error() and protocol.SECAGG_KEY in reply.content:
            self.advertised[node] = reply.content[protocol.SECAGG_KEY]
        return reply

    def train_all(self) -> None:
        for node in self.nodes:
            self.train(node)

    def stage(self, node: int, request: dict) -> Message:
        """One stage request through the real ClientApp (request checks, stage handler, error replies)."""
        request = {"round": self.server_round, "session": self.session_id, **request}
        message = Message(RecordDict({protocol.SECAGG_KEY: ConfigRecord(request)}), dst_node_id=node,
                          message_type=protocol.SECAGG_MESSAGE_TYPE)
        message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        message.metadata.__dict__["_src_node_id"] = 1
        return client_app(message, self.contexts[node])

    def cohort_request(self, cohort: list[int] | None = None) -> dict:
        """The cohort stage's request listing ``cohort`` (default: every site) with their signed adverts."""
        listed = sorted(self.nodes if cohort is None else cohort)
        request = {"stage": "cohort", "peers": listed}
        for name in ADVERT_FIELDS:
            request[f"{name}s"] = [bytes(self.advertised[p][name]) for p in listed]
        return request

    def reveal(self, node: int, cohort: list[int] | None = None, request: dict | None = None) -> Message:
        """The cohort stage for ``node``: it fixes the listed cohort and reveals its graph nonce (kept here)."""
        reply = self.stage(node, request or self.cohort_request(cohort))
        if not reply.has_error():
            self.nonces[node] = bytes(reply.content[protocol.SECAGG_KEY]["nonce"])
            signature = reply.content[protocol.SECAGG_KEY].get("cohort_signature")
            if signature is not None:  # sites before the cohort cross-check sent none
                self.cohort_signatures[node] = bytes(signature)
        return reply

    def share_request(self, node: int, cohort: list[int] | None = None) -> dict:
        """The share request listing ``cohort`` (default: every site) with their signed adverts and
        revealed graph nonces; every listed site not yet asked is first shown the same list."""
        request = self.cohort_request(cohort)
        for peer in request["peers"]:
            if peer not in self.nonces:
                self.reveal(peer, cohort)
        request["stage"] = "share"
        request["nonces"] = [self.nonces.get(p, bytes(32)) for p in request["peers"]]
        if self.cohort_signatures:
            request["cohort_signatures"] = [self.cohort_signatures.get(p, b"") for p in request["peers"]]
        return request

    def share(self, node: int, cohort: list[int] | None = None) -> dict[int, bytes]:
        reply = self.stage(node, self.share_request(node, cohort))
        assert not reply.has_error(), reply.error.reason
        record = reply.content[protocol.SECAGG_KEY]
        return {int(to): bytes(c) for to, c in zip(record["to"], record["ciphertexts"], strict=True)}

    def mask(self, node: int, received: dict[int, bytes]) -> Message:
        reply = self.stage(node, {"stage": "mask", "from": list(received), "ciphertexts": list(received.values())})
        if not reply.has_error():
            record = reply.content[protocol.SECAGG_REJECTED_KEY]
            self.partner_statements[node] = (
                protocol.partner_list_bytes([int(n) for n in record[protocol.SECAGG_PARTNERS_FIELD]]),
                bytes(record[protocol.SECAGG_PARTNERS_SIGNATURE_FIELD]),
            )
        return reply

    def endorse(self, node: int, survivors: set[int]) -> Message:
        """The consistency round's request: ``node`` signs ``survivors`` (or refuses)."""
        return self.stage(node, {"stage": "consistency", "survivors": sorted(survivors)})

    def endorse_all(self, nodes, survivors: set[int]) -> dict[int, bytes]:
        """Signatures of ``nodes`` on ``survivors`` (those that signed)."""
        replies = {node: self.endorse(node, survivors) for node in nodes}
        return {n: bytes(r.content[protocol.SECAGG_KEY]["signature"]) for n, r in replies.items() if not r.has_error()}

    def unmask(self, node: int, survivors: set[int], dropped: set[int], endorsements: dict[int, bytes] | None = None
               ) -> Message:
        signers = sorted(endorsements or {})
        listed = sorted(self.partner_statements)  # every genuine list the server holds
        return self.stage(node, {"stage": "unmask", "survivors": sorted(survivors), "dropped": sorted(dropped),
                                 "signers": signers, "signatures": [endorsements[n] for n in signers],
                                 "partner_nodes": listed,
                                 "partner_lists": [self.partner_statements[n][0] for n in listed],
                                 "partner_signatures": [self.partner_statements[n][1] for n in listed]})

    def honest_shares(self) -> dict[int, dict[int, bytes]]:
        """Stage 1 for every site, each shown the whole cohort; returns each site's inbox."""
        sent = {node: self.share(node) for node in self.nodes}
        return {node: {s: c[node] for s, c in sent.items() if node in c} for node in self.nodes}

    def honest_until_masked(self) -> None:
        """Train, share and mask honestly for every site (each mask must succeed)."""
        self.train_all()
        inbox = self.honest_shares()
        for node in self.nodes:
            reply = self.mask(node, inbox[node])
            assert not reply.has_error(), reply.error.reason

    def rebuild_from_self_seed(self, masked: np.ndarray, seed_shares: list[bytes]) -> np.ndarray | None:
        """The attack's last step: remove the self-mask rebuilt from ``seed_shares``; the site's
        input (dequantized), or None when the shares are too few to rebuild the seed."""
        threshold = int(self.cfg.secure_agg.threshold)
        if len(seed_shares) < threshold:
            return None
        seed = combine_shares(seed_shares[:threshold], threshold)
        bits = int(self.cfg.secure_agg.modulus_bits)
        return _dequantized(self, apply_masks(np.array(masked, dtype=np.uint64), [(seed, SUBTRACT)], bits))


def revealed(reply: Message) -> dict[int, tuple[str, bytes]]:
    record = reply.content[protocol.SECAGG_KEY]
    return {int(p): (str(k), bytes(s)) for p, k, s in zip(record["for"], record["kinds"], record["shares"], strict=True)}


def is_input_of(rebuilt: np.ndarray | None, node: int) -> bool:
    """Whether ``rebuilt`` is site ``node``'s update (the stand-in training's step on every coordinate)."""
    return rebuilt is not None and bool(np.allclose(rebuilt, step(node), atol=1e-3))


def key_substitution_attack(server: HostileServer, target: int, peers: list[int]) -> tuple[Message, np.ndarray | None]:
    """Attack 1: relay the server's own round keys as ``peers``' keys to ``target``.

    With old clients the target seals every share for keys the server holds: the server opens
    them, rebuilds the target's self-mask seed and mask private key, feeds the target shares
    it made itself so it masks, and removes every mask. Returns the target's share-stage
    reply and the rebuilt input (None when the attack stopped short).
    """
    bits, threshold = int(server.cfg.secure_agg.modulus_bits), int(server.cfg.secure_agg.threshold)
    fakes = {peer: (generate_key_pair(), generate_key_pair()) for peer in peers}
    request = server.share_request(target)
    listed = request["peers"]
    request["envelope_keys"] = [fakes[p][0].public_bytes if p in fakes else e for p, e in zip(listed, request["envelope_keys"])]
    request["mask_keys"] = [fakes[p][1].public_bytes if p in fakes else m for p, m in zip(listed, request["mask_keys"])]
    reply = server.stage(target, request)
    if reply.has_error():
        return reply, None
    record = reply.content[protocol.SECAGG_KEY]
    target_envelope = bytes(server.advertised[target]["envelope_key"])
    target_mask = bytes(server.advertised[target]["mask_key"])
    seed_shares, key_shares, crafted = [], [], {}
    for to, sealed in zip(record["to"], record["ciphertexts"], strict=True):
        key = derive_shared_key(fakes[int(to)][0].private, target_envelope, SHARE_PURPOSE)
        payload = open_sealed(key, bytes(sealed), sender=target, receiver=int(to), server_round=server.server_round)
        length = int.from_bytes(payload[:2], "big")
        seed_shares.append(payload[2 : 2 + length])
        key_shares.append(payload[2 + length :])
    junk = split_secret(bytes(32), threshold, len(peers))
    for index, peer in enumerate(peers):  # shares "from" the fake peers, so the target masks with them
        key = derive_shared_key(fakes[peer][0].private, target_envelope, SHARE_PURPOSE)
        payload = len(junk[index]).to_bytes(2, "big") + junk[index] + junk[index]
        crafted[peer] = seal(key, payload, sender=peer, receiver=target, server_round=server.server_round)
    masked_reply = server.mask(target, crafted)
    if masked_reply.has_error():
        return masked_reply, None
    seed = combine_shares(seed_shares[:threshold], threshold)
    target_private = private_key_from_bytes(combine_shares(key_shares[:threshold], threshold))
    assert public_key_of(target_private) == target_mask
    removals = [(seed, SUBTRACT)]
    for peer in peers:
        pairwise = derive_shared_key(target_private, fakes[peer][1].public_bytes, MASK_PURPOSE)
        removals.append((pairwise, SUBTRACT if target < peer else ADD))
    masked = masked_reply.content[protocol.SECAGG_KEY]["masked"].numpy()
    clear = apply_masks(np.array(masked, dtype=np.uint64), removals, bits)
    return reply, _dequantized(server, clear)


def public_key_of(private) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _dequantized(server: HostileServer, clear: np.ndarray) -> np.ndarray:
    sa = server.cfg.secure_agg
    levels = levels_for(int(sa.modulus_bits), int(server.cfg.simulation.num_clients))
    weighted = dequantize_sum(clear[:-1], 1, float(sa.clip_range) * float(sa.max_weight), levels)
    weight = dequantize_sum(clear[-1:], 1, float(sa.max_weight), levels)[0]
    return weighted / max(weight, 1e-12)


def inconsistent_survivors_attack(
    server: HostileServer, target: int, colluders: list[int], told_survived: int, told_dropped: int
) -> tuple[Message | None, np.ndarray | None]:
    """Attack 4: the server, holding ``colluders``' shares and identity keys, shows
    ``told_survived`` a survivor set with ``target`` in it (for its self-mask seed share) and
    ``told_dropped`` one without it (for its mask-key share), then rebuilds the target's input.

    Returns ``told_dropped``'s unmask reply (None if never asked) and the rebuilt input (or None).
    """
    from fedguard.clients.secagg_identity import SECAGG_DIR
    from fedguard.clients.secure_aggregation import SESSION_STATE_KEY
    from fedguard.privacy.secagg import identity as identities
    from fedguard.privacy.secagg.protocol import ClientSession

    threshold, bits = int(server.cfg.secure_agg.threshold), int(server.cfg.secure_agg.modulus_bits)
    inbox = server.honest_shares()
    masked = {n: server.mask(n, inbox[n]) for n in server.nodes}
    held = {c: ClientSession.from_dict(server.contexts[c].state[SESSION_STATE_KEY])._held_shares[target]
            for c in colluders}  # noqa: SLF001 - what a colluding client hands the server
    seed_shares = [held[c][0] for c in colluders]
    key_shares = [held[c][1] for c in colluders]
    with_target, without_target = set(server.nodes), set(server.nodes) - {target}
    first = server.endorse(told_survived, with_target)
    legacy = first.has_error() and "unknown secure aggregation stage" in first.error.reason
    stories = ((told_survived, with_target, set(), 0), (told_dropped, without_target, {target}, 1))
    dropped_reply = None
    for node, survivors, dropped, kind in stories:
        if legacy:  # clients without a consistency round: the old unmask request
            reply = server.stage(node, {"stage": "unmask", "survivors": sorted(survivors), "dropped": sorted(dropped)})
        else:
            signatures = {}
            for colluder in colluders:
                key = identities.load_or_create_identity(server.state_dirs[colluder] / SECAGG_DIR / identities.IDENTITY_FILE)
                signed = identities.survivors_bytes(server.server_round, server.session_id, survivors)
                signatures[colluder] = key.sign(signed)
            if node == told_dropped:
                signatures.update(server.endorse_all([told_dropped], survivors))
            else:
                signatures.update(server.endorse_all([target], with_target))
                signatures.update({told_survived: bytes(first.content[protocol.SECAGG_KEY]["signature"])})
            reply = server.unmask(node, survivors, dropped, signatures)
        if node == told_dropped:
            dropped_reply = reply
        if not reply.has_error() and target in revealed(reply):
            (seed_shares if kind == 0 else key_shares).append(revealed(reply)[target][1])
    if len(seed_shares) < threshold or len(key_shares) < threshold:
        return dropped_reply, None
    seed = combine_shares(seed_shares[:threshold], threshold)
    target_private = private_key_from_bytes(combine_shares(key_shares[:threshold], threshold))
    removals = [(seed, SUBTRACT)]
    for peer in server.nodes:
        if peer != target:
            pairwise = derive_shared_key(target_private, bytes(server.advertised[peer]["mask_key"]), MASK_PURPOSE)
            removals.append((pairwise, SUBTRACT if target < peer else ADD))
    clear = apply_masks(np.array(masked[target].content[protocol.SECAGG_KEY]["masked"].numpy(), dtype=np.uint64),
                        removals, bits)
    return dropped_reply, _dequantized(server, clear)


def withheld_share_attack(
    server: HostileServer, target: int, colluders: list[int], withheld_from: int, told_dropped: int
) -> tuple[Message, np.ndarray | None]:
    """The withholding attack (review of 2026-12-01): one consistent survivor set, no split story.

    The server withholds honest ``withheld_from``'s share from ``target`` (so, on code that
    masks only with the neighbours it heard from, the target has no mask with it) and names
    honest ``told_dropped`` dropped to everyone. ``withheld_from`` still holds the target's
    seed share and, as a survivor with enough signatures on the one survivor set, reveals it
    and ``told_dropped``'s key share. With the colluders' own keys and shares that is every
    mask on the target's input. Returns ``withheld_from``'s unmask reply (None if never asked)
    and the rebuilt input (or None).
    """
    from fedguard.clients.secure_aggregation import SESSION_STATE_KEY
    from fedguard.privacy.secagg.protocol import ClientSession

    threshold, bits = int(server.cfg.secure_agg.threshold), int(server.cfg.secure_agg.modulus_bits)
    inbox = server.honest_shares()
    target_reply = server.mask(target, {s: c for s, c in inbox[target].items() if s != withheld_from})
    if target_reply.has_error():
        return None, None
    for node in server.nodes:
        if node != target:
            server.mask(node, inbox[node])
    sessions = {c: ClientSession.from_dict(server.contexts[c].state[SESSION_STATE_KEY]) for c in colluders}
    seed_shares = [sessions[c]._held_shares[target][0] for c in colluders]  # noqa: SLF001 - colluders hand them over
    key_shares = [sessions[c]._held_shares[told_dropped][1] for c in colluders]  # noqa: SLF001
    survivors = set(server.nodes) - {told_dropped}
    endorsements = server.endorse_all(sorted(survivors), survivors)
    reply = server.unmask(withheld_from, survivors, {told_dropped}, endorsements)
    if not reply.has_error():
        shown = revealed(reply)
        seed_shares += [shown[target][1]] if target in shown else []
        key_shares += [shown[told_dropped][1]] if told_dropped in shown else []
    if len(seed_shares) < threshold or len(key_shares) < threshold:
        return reply, None
    dropped_private = private_key_from_bytes(combine_shares(key_shares[:threshold], threshold))
    target_mask_key = bytes(server.advertised[target]["mask_key"])
    removals = [(combine_shares(seed_shares[:threshold], threshold), SUBTRACT)]
    partners = {c: sessions[c]._mask_keys.private for c in colluders}  # noqa: SLF001
    partners[told_dropped] = dropped_private
    for peer, private in partners.items():
        removals.append((derive_shared_key(private, target_mask_key, MASK_PURPOSE), SUBTRACT if target < peer else ADD))
    masked = np.array(target_reply.content[protocol.SECAGG_KEY]["masked"].numpy(), dtype=np.uint64)
    return reply, _dequantized(server, apply_masks(masked, removals, bits))


def small_cohort_attack(server: HostileServer, target: int, colluders: list[int]) -> tuple[str | None, np.ndarray | None]:
    """The review's high finding: show ``target`` a cohort of itself and ``threshold`` colluders.

    The graph over so small a list is complete, so every neighbour of the target is a
    colluder; they hold ``threshold`` shares of both its self-mask seed and its mask key, and
    hand them over. Returns the target's refusal (None if it took part) and its rebuilt
    input (None when the attack stopped short).
    """
    from fedguard.clients.secure_aggregation import SESSION_STATE_KEY
    from fedguard.privacy.secagg.errors import SecAggError
    from fedguard.privacy.secagg.protocol import ClientSession

    threshold, bits = int(server.cfg.secure_agg.threshold), int(server.cfg.secure_agg.modulus_bits)
    cohort = sorted([target, *colluders])
    for node in cohort:
        try:
            reply = server.train(node)
        except SecAggError as err:  # the mod's refusal (the ClientApp sends it back as the error reply)
            return str(err), None
        if reply.has_error():
            return reply.error.reason, None
    for node in cohort:
        reply = server.reveal(node, cohort)
        if reply.has_error():
            return reply.error.reason, None
    sent = {}
    for node in cohort:
        reply = server.stage(node, server.share_request(node, cohort))
        if reply.has_error():
            return reply.error.reason, None
        record = reply.content[protocol.SECAGG_KEY]
        sent[node] = {int(to): bytes(c) for to, c in zip(record["to"], record["ciphertexts"], strict=True)}
    masked = {}
    for node in cohort:
        reply = server.mask(node, {s: c[node] for s, c in sent.items() if node in c})
        if reply.has_error():
            return reply.error.reason, None
        masked[node] = reply
    sessions = {c: ClientSession.from_dict(server.contexts[c].state[SESSION_STATE_KEY]) for c in colluders}
    held = [sessions[c]._held_shares[target] for c in colluders]  # noqa: SLF001 - colluders hand them over
    if len(held) < threshold:
        return None, None
    seed = combine_shares([h[0] for h in held[:threshold]], threshold)
    target_private = private_key_from_bytes(combine_shares([h[1] for h in held[:threshold]], threshold))
    removals = [(seed, SUBTRACT)]
    for peer in colluders:
        pairwise = derive_shared_key(target_private, bytes(server.advertised[peer]["mask_key"]), MASK_PURPOSE)
        removals.append((pairwise, SUBTRACT if target < peer else ADD))
    clear = apply_masks(np.array(masked[target].content[protocol.SECAGG_KEY]["masked"].numpy(), dtype=np.uint64),
                        removals, bits)
    return None, _dequantized(server, clear)
