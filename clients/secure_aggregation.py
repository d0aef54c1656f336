"""Client side of SecAgg+: a mod around the train handler plus the protocol-stage handler.

The mod lets local training run unchanged, then keeps the reply's model update on the
client (in Context.state) and sends only public keys and metrics. The stage handler
(message type ``train.secagg``) then runs the share, mask and unmask stages; the
masked update is the only form in which the update ever leaves the client.

The held update is stored in the model's float precision (float32 for fedguard's
models) and quantized only at the mask stage: Context.state travels with every message
a simulated client handles (twice per stage under Ray), so a uint64 vector there would
cost twice the bytes on each of those trips. Quantizing later changes nothing the
server sees: the same clipping, levels and unbiased rounding apply.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedguard.clients.secagg_identity import site_identity, site_roster, verified_peers
from fedguard.clients.secagg_record import session_record
from fedguard.clients.site import read_secagg_policy
from fedguard.clients.wire import protocol
from fedguard.clients.wire.arrays import array_view, flatten_update, numpy_array
from fedguard.conf.plans import clients_per_round
from fedguard.conf.run_config import cached_config_from_yaml
from fedguard.privacy.secagg.identity import RosterError, cohort_bytes, public_bytes, sign_advert, unconfirmed_cohort
from fedguard.privacy.secagg.policy import SitePolicy
from fedguard.privacy.secagg.masking import levels_for, quantize
from fedguard.privacy.secagg.params import cohort_digest, graph_seed, nonce_commitment
from fedguard.privacy.secagg.protocol import ClientSession, SecAggError, SecAggParams, neighbour_graph

logger = logging.getLogger(__name__)

SESSION_STATE_KEY = "fedguard.secagg-session"
INPUT_STATE_KEY = "fedguard.secagg-input"
INPUT_ARRAY = "input"
# Alongside the held update: its weight and the encoding settings, since stage requests
# carry no config.
ENCODING_STATE_KEY = "fedguard.secagg-encoding"
WEIGHT, CLIP_RANGE, MAX_WEIGHT = "weight", "clip_range", "max_weight"
MODULUS_BITS, MAX_CLIENTS = "modulus_bits", "max_clients"
# Set instead when the held input is already quantized (hold_encoded_input).
ENCODED = "encoded"
FLOAT32_BYTES = 4
# The advert's identity fields: the site's Ed25519 public key and its signature over the round keys.
IDENTITY_FIELD, SIGNATURE_FIELD, COMMITMENT_FIELD = "identity_key", "signature", "seed_commitment"
NONCE_COMMITMENT_FIELD = "nonce_commitment"
# The cohort list's per-site fields in stage requests, in the order of an advert tuple.
COHORT_FIELDS = ("envelope_keys", "mask_keys", "identity_keys", "signatures", "seed_commitments", "nonce_commitments")


def params_from(cfg) -> SecAggParams:
    sa = cfg.secure_agg
    return SecAggParams(modulus_bits=int(sa.modulus_bits), neighbours=int(sa.neighbours), threshold=int(sa.threshold))


def _check_weighted_update(update: np.ndarray, weight: float, max_weight: float) -> None:
    if not np.all(np.isfinite(update)):
        raise ValueError("the model update holds NaN or infinite values; not sending it into the aggregate")
    if not 0 < weight <= max_weight:
        raise ValueError(f"example count {weight} is outside (0, secure_agg.max_weight={max_weight}]")


def _encode(update: np.ndarray, weight: float, clip_range: float, max_weight: float, levels: int) -> np.ndarray:
    rng = np.random.default_rng()  # OS entropy: rounding noise must not be predictable
    encoded = np.empty(update.size + 1, dtype=np.uint64)  # [weight x clipped update, weight]
    quantize(update, clip_range * max_weight, levels, rng, out=encoded[:-1], value_clip=clip_range, weight=weight)
    quantize(np.array([float(weight)]), float(max_weight), levels, rng, out=encoded[-1:])
    return encoded


def encode_weighted_update(update: np.ndarray, weight: float, cfg) -> np.ndarray:
    """Quantize [weight x clipped update, weight] so the server can form a weighted mean from sums."""
    sa = cfg.secure_agg
    _check_weighted_update(update, weight, sa.max_weight)
    levels = levels_for(int(sa.modulus_bits), int(cfg.simulation.num_clients))
    return _encode(update, weight, float(sa.clip_range), float(sa.max_weight), levels)


def _storage_dtype(arrays: ArrayRecord) -> np.dtype:
    """float32 when no model array is wider; the update is then exactly new - old rounded once."""
    wide = any(np.dtype(arrays[key].dtype).itemsize > FLOAT32_BYTES for key in arrays.keys())
    return np.dtype(np.float64 if wide else np.float32)


def hold_update(context: Context, update: np.ndarray, weight: float, cfg, model: ArrayRecord) -> None:
    """Keep the checked update and what encoding it needs in the client's own state until the mask stage."""
    sa = cfg.secure_agg
    _check_weighted_update(update, weight, sa.max_weight)
    context.state[INPUT_STATE_KEY] = ArrayRecord({INPUT_ARRAY: numpy_array(update.astype(_storage_dtype(model), copy=False))})
    context.state[ENCODING_STATE_KEY] = ConfigRecord(
        {
            WEIGHT: float(weight),
            CLIP_RANGE: float(sa.clip_range),
            MAX_WEIGHT: float(sa.max_weight),
            MODULUS_BITS: int(sa.modulus_bits),
            MAX_CLIENTS: int(cfg.simulation.num_clients),
        }
    )


def hold_encoded_input(context: Context, encoded: np.ndarray) -> None:
    """Keep an input that is already SecAgg+ integers (federated preprocessing's statistics,
    clients/preprocessing.py) until the mask stage; it is masked as it is."""
    if encoded.dtype != np.uint64:
        raise ValueError(f"an encoded input is a uint64 vector; got {encoded.dtype}")
    context.state[INPUT_STATE_KEY] = ArrayRecord({INPUT_ARRAY: numpy_array(encoded)})
    context.state[ENCODING_STATE_KEY] = ConfigRecord({ENCODED: True})


def encode_held_update(context: Context) -> np.ndarray:
    """The held update, quantized for masking (see the module docstring for why only now)."""
    encoding = context.state[ENCODING_STATE_KEY]
    if encoding.get(ENCODED, False):
        return array_view(context.state[INPUT_STATE_KEY][INPUT_ARRAY]).astype(np.uint64, copy=True)
    update = array_view(context.state[INPUT_STATE_KEY][INPUT_ARRAY])
    levels = levels_for(int(encoding[MODULUS_BITS]), int(encoding[MAX_CLIENTS]))
    return _encode(update, float(encoding[WEIGHT]), float(encoding[CLIP_RANGE]), float(encoding[MAX_WEIGHT]), levels)


def _signed_advert(context: Context, session: ClientSession, envelope_public: bytes, mask_public: bytes) -> dict:
    """The site's identity public key and its signature over the round keys (empty without a state dir:
    peers then leave this site out, see clients/secagg_identity.py)."""
    identity = site_identity(dict(context.node_config))
    if identity is None:
        logger.warning("client %d: no state dir, so no identity key: advertising unsigned keys", context.node_id)
        return {IDENTITY_FIELD: b"", SIGNATURE_FIELD: b"", COMMITMENT_FIELD: session.seed_commitment(),
                NONCE_COMMITMENT_FIELD: session.nonce_commitment()}
    signature = sign_advert(identity, session.server_round, session.session_id, context.node_id, envelope_public,
                            mask_public, session.seed_commitment(), session.nonce_commitment())
    return {IDENTITY_FIELD: public_bytes(identity), SIGNATURE_FIELD: signature, COMMITMENT_FIELD: session.seed_commitment(),
            NONCE_COMMITMENT_FIELD: session.nonce_commitment()}


def site_policy(context: Context) -> SitePolicy:
    """This site's SecAgg+ limits, with the defaults its own roster gives (clients/site.py)."""
    node_config = dict(context.node_config)
    try:
        roster_size: int | None = len(site_roster(node_config).sites)
    except RosterError:
        roster_size = None  # no roster: the site refuses at the cohort stage, naming what is missing
    return read_secagg_policy(node_config, roster_size)


def _lineage(config: ConfigRecord, context: Context) -> str:
    """The federation lineage the train request names (it survives resumes), else this Flower run."""
    lineage = config.get(protocol.LINEAGE_KEY)
    return lineage if isinstance(lineage, str) and lineage else f"run-{context.run_id}"


def check_session_request(context: Context, cfg, config: ConfigRecord,
                          server_round: int) -> tuple[SecAggParams, bytes, str]:
    """Before anything is computed or spent: the announced parameters meet this site's policy,
    and the session id and round are fresh in the site's session record, which lives in its
    state dir across runs and restarts (clients/secagg_record.py). A second session on a round
    would let the server difference two sums. Returns the parameters, the id and the lineage."""
    params = params_from(cfg)
    policy = site_policy(context)
    policy.check_announced(params.neighbours, params.threshold, clients_per_round(cfg))
    session_id = config.get(protocol.SECAGG_SESSION_KEY, b"")
    session_id = session_id if isinstance(session_id, bytes) else b""
    lineage = _lineage(config, context)
    with session_record(context) as record:
        record.check_fresh(context.node_id, lineage, server_round, session_id)
        # A site that would refuse this run's next reveal does not compute for it (DP sites would spend for nothing).
        record.check_reveal(context.node_id, context.run_id, session_id, policy.max_unfinished_reveals)
    return params, session_id, lineage


def enter_session(context: Context, params: SecAggParams, server_round: int, session_id: bytes,
                  lineage: str) -> ConfigRecord:
    """Record the session and start this site's protocol for its held input; the advert (stage 0) to send back."""
    with session_record(context) as record:  # checked again under the lock: another process may have entered it
        record.check_fresh(context.node_id, lineage, server_round, session_id)
        record.remember(lineage, server_round, session_id)
        record.note_entered(context.run_id, session_id)  # unfinished until its masked input exists
    session = ClientSession(context.node_id, params, server_round, session_id=session_id)
    envelope_public, mask_public = session.advertise()
    context.state[SESSION_STATE_KEY] = ConfigRecord(session.to_dict())
    return ConfigRecord({"stage": "advertise", "envelope_key": envelope_public, "mask_key": mask_public,
                         **_signed_advert(context, session, envelope_public, mask_public)})


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Train as usual, then hold the update back and advertise SecAgg+ keys instead.
    Installed only for runs with secure_agg=secaggplus (clients/layers.py)."""
    cfg = cached_config_from_yaml(str(msg.content[protocol.CONFIG_KEY][protocol.FEDGUARD_CONFIG_KEY]))
    config = msg.content[protocol.CONFIG_KEY]
    server_round = int(config.get(protocol.SERVER_ROUND_KEY, 0))
    # Before training: a round this site would refuse must not spend its privacy budget.
    params, session_id, lineage = check_session_request(context, cfg, config, server_round)
    reply = call_next(msg, context)
    if reply.has_error() or protocol.ARRAYS_KEY not in reply.content:
        return reply  # errors and budget refusals pass through unchanged
    storage = _storage_dtype(msg.content[protocol.ARRAYS_KEY])  # subtract in the dtype the update is held in
    update = flatten_update(reply.content[protocol.ARRAYS_KEY], msg.content[protocol.ARRAYS_KEY], storage)
    if protocol.CLIP_INDICATOR_KEY in reply.content:  # client-level DP's (noised) clip indicator: summed masked, never sent
        indicator = float(reply.content[protocol.CLIP_INDICATOR_KEY][protocol.CLIP_INDICATOR_FIELD])
        update = np.append(update, np.array([indicator], dtype=storage))
    weight = float(reply.content[protocol.METRICS_KEY][protocol.NUM_EXAMPLES_KEY])
    hold_update(context, update, weight, cfg, msg.content[protocol.ARRAYS_KEY])
    content = RecordDict(
        {
            protocol.METRICS_KEY: reply.content[protocol.METRICS_KEY],
            protocol.SECAGG_KEY: enter_session(context, params, server_round, session_id, lineage),
        }
    )
    for key in (protocol.PRIVACY_KEY, protocol.LEDGER_KEY):  # the spend report and its signed record
        if key in reply.content:
            content[key] = reply.content[key]
    return Message(content, reply_to=msg)


def _verified_cohort(
    context: Context, session: ClientSession, cohort: dict[int, tuple[bytes, ...]]
) -> dict[int, tuple[bytes, bytes]]:
    """The listed peers' round keys, once the whole cohort list checks out against this site's roster.

    The list holds every site of the round's cohort (this one included) with its signed
    advert. Every advert must verify: the graph is drawn from the whole list, and an advert
    this site cannot check could be one the server made up.
    """
    node_config = dict(context.node_config)
    roster, identity = site_roster(node_config), site_identity(node_config)
    own = public_bytes(identity) if identity is not None else b""
    mine = cohort.get(context.node_id)
    expected = (*session.advertise(), own, session.seed_commitment(), session.nonce_commitment())
    if mine is None or (*mine[:3], *mine[4:]) != expected:
        raise SecAggError(f"client {context.node_id}: the cohort list does not hold this site's own advert")
    session.policy.check_cohort(len(cohort))
    others = {node: advert for node, advert in cohort.items() if node != context.node_id}
    verified = verified_peers(roster, own, session.server_round, session.session_id, others)
    if len(verified) != len(others):
        raise SecAggError(
            f"client {context.node_id}: {len(others) - len(verified)} advert(s) of the cohort list fail verification "
            f"against this site's roster; refusing a neighbour graph derived from them"
        )
    return verified


def _own_neighbours(
    context: Context, session: ClientSession, cohort: dict[int, tuple[bytes, ...]], nonces: dict[int, bytes]
) -> dict[int, tuple[bytes, bytes]]:
    """This site's neighbours' round keys, derived by the site itself from the cohort list it fixed
    and every listed site's revealed graph nonce (each checked against its signed commitment)."""
    verified = _verified_cohort(context, session, cohort)
    if cohort_digest(session.server_round, session.session_id, cohort) != session.cohort_digest:
        raise SecAggError(f"client {context.node_id}: the share request's cohort list differs from the one it fixed")
    if set(nonces) != set(cohort):
        raise SecAggError(f"client {context.node_id}: graph nonces missing for {sorted(set(cohort) - set(nonces))}")
    forged = sorted(node for node, nonce in nonces.items() if nonce_commitment(nonce) != cohort[node][5])
    if forged:
        raise SecAggError(f"client {context.node_id}: revealed graph nonce(s) of {forged} do not match their commitments")
    seed = graph_seed(session.cohort_digest, nonces)
    peers = neighbour_graph(sorted(cohort), session.params.neighbours, seed)[context.node_id]
    return {peer: verified[peer] for peer in sorted(peers)}


def _check_cohort_confirmed(
    context: Context, session: ClientSession, cohort: dict[int, tuple[bytes, ...]], signatures: dict[int, bytes]
) -> None:
    """Every listed site signed (its roster identity key) the digest of the very list this site fixed.

    Why: the server could otherwise show each site its own list, e.g. this site a short one
    of its choosing while the listed honest sites see another; their signatures over this
    site's digest prove they fixed the same list. ``_own_neighbours`` has already checked
    every listed identity against the roster and the list against this site's own digest.
    """
    identities = {node: advert[2] for node, advert in cohort.items() if node != context.node_id}
    missing = unconfirmed_cohort(identities, signatures, session.cohort_digest)
    if missing:
        raise SecAggError(
            f"client {context.node_id}: no valid signature on the cohort list this site fixed from {missing}; "
            "a site shown another list (or none) signed another digest, so the server showed different lists"
        )


def _cohort_of(request) -> dict[int, tuple[bytes, ...]]:
    """node -> (envelope key, mask key, identity key, signature, seed commitment, nonce commitment)."""
    columns = [request[field] for field in COHORT_FIELDS]
    return {int(p): tuple(bytes(column[i]) for column in columns) for i, p in enumerate(request["peers"])}


def wipe_round(context: Context) -> None:
    """Forget this round's secure-aggregation secrets and held update (the round aborted for this client)."""
    for key in (SESSION_STATE_KEY, INPUT_STATE_KEY, ENCODING_STATE_KEY):
        if key in context.state:
            del context.state[key]


def handle_stage(msg: Message, context: Context) -> Message:
    """Stages 1-3 of SecAgg+ (cohort, share, mask, consistency, unmask) for this client; its session lives in Context.state between them.

    A protocol refusal (too few shares, a request that names this client dropped, ...)
    aborts the round for this client: its keys, seed, held shares and clear update are
    dropped from its state before the refusal goes back, so no later request can use them.
    """
    try:
        return _handle_stage(msg, context)
    except SecAggError as err:
        logger.warning("client %d: secure aggregation round aborted, secrets wiped: %s", context.node_id, err)
        wipe_round(context)
        raise


def _handle_stage(msg: Message, context: Context) -> Message:
    request = msg.content[protocol.SECAGG_KEY]
    stage = str(request["stage"])
    session = ClientSession.from_dict(context.state[SESSION_STATE_KEY], site_policy(context))
    if stage == "cohort":
        cohort = _cohort_of(request)
        _verified_cohort(context, session, cohort)
        identity = site_identity(dict(context.node_config))
        if identity is None:
            raise SecAggError(f"client {context.node_id}: no identity key to sign the cohort list with")
        with session_record(context) as record:  # read only: the session counts as unfinished since its advert
            record.check_reveal(context.node_id, context.run_id, session.session_id, session.policy.max_unfinished_reveals)
        nonce = session.fix_cohort(cohort_digest(session.server_round, session.session_id, cohort))
        answer = ConfigRecord({"nonce": nonce,
                               "cohort_signature": identity.sign(cohort_bytes(context.node_id, session.cohort_digest))})
    elif stage == "share":
        adverts = _cohort_of(request)
        nonces = {int(p): bytes(n) for p, n in zip(request["peers"], request["nonces"], strict=True)}
        signatures = {int(p): bytes(g) for p, g in zip(request["peers"], request["cohort_signatures"], strict=True)}
        neighbours = _own_neighbours(context, session, adverts, nonces)
        _check_cohort_confirmed(context, session, adverts, signatures)
        sealed = session.share(neighbours)
        session.peer_identities = {peer: adverts[peer][2] for peer in sealed}
        answer = ConfigRecord({"to": list(sealed), "ciphertexts": list(sealed.values())})
    elif stage == "mask":
        received = {int(s): bytes(c) for s, c in zip(request["from"], request["ciphertexts"], strict=True)}
        masked = session.mask(received, encode_held_update(context), overwrite_input=True)
        del context.state[INPUT_STATE_KEY]  # the clear input is no longer needed
        del context.state[ENCODING_STATE_KEY]
        with session_record(context, durable=False) as record:  # lost in a crash, it still counts: the safe side
            record.note_masked(context.run_id, session.session_id)
        context.state[SESSION_STATE_KEY] = ConfigRecord(session.to_dict())
        identity = site_identity(dict(context.node_config))
        if identity is None:
            raise SecAggError(f"client {context.node_id}: no identity key to sign its mask partners with")
        rejected = ConfigRecord({
            protocol.SECAGG_REJECTED_FIELD: sorted(session.rejected_senders),
            protocol.SECAGG_PARTNERS_FIELD: sorted(session.neighbours),
            protocol.SECAGG_PARTNERS_SIGNATURE_FIELD: session.sign_partners(identity),
        })
        reply = RecordDict({protocol.SECAGG_KEY: ArrayRecord({"masked": numpy_array(masked)}), protocol.SECAGG_REJECTED_KEY: rejected})
        return Message(reply, reply_to=msg)
    elif stage == "consistency":
        identity = site_identity(dict(context.node_config))
        if identity is None:
            raise SecAggError(f"client {context.node_id}: no identity key to sign the survivor set with")
        answer = ConfigRecord({"signature": session.endorse({int(n) for n in request["survivors"]}, identity)})
    elif stage == "unmask":
        endorsements = {int(n): bytes(g) for n, g in zip(request["signers"], request["signatures"], strict=True)}
        try:
            statements = {
                int(n): (protocol.partner_list_from_bytes(bytes(lst)), bytes(g))
                for n, lst, g in zip(request["partner_nodes"], request["partner_lists"], request["partner_signatures"],
                                     strict=True)
            }
        except (KeyError, ValueError) as err:
            raise SecAggError(f"client {context.node_id}: unreadable mask-partner lists in the unmask request: {err}") from None
        revealed = session.unmask({int(n) for n in request["survivors"]}, {int(n) for n in request["dropped"]},
                                  endorsements, statements)
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
    context.state[SESSION_STATE_KEY] = ConfigRecord(session.to_dict())
    return Message(RecordDict({protocol.SECAGG_KEY: answer}), reply_to=msg)
