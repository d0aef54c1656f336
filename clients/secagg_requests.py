"""Form checks on SecAgg+ stage requests, before the protocol session touches them.

Every stage request names the round and the session (the server's random id, signed by
the sites with their round keys) it belongs to; one for another round or session, a
replay of an earlier session's request, is refused here without touching the client's
state. Stage order (share, then mask, then unmask, each once) is the session's own
state machine (privacy/secagg/protocol.py): cohort, share, mask, consistency, unmask.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message

from fedguard.clients.secure_aggregation import INPUT_STATE_KEY, SESSION_STATE_KEY, handle_stage
from fedguard.clients.wire import protocol
from fedguard.clients.wire.checks import (
    MAX_PEERS,
    MAX_SHARE_BYTES,
    PUBLIC_KEY_BYTES,
    MalformedMessage,
    byte_strings,
    count,
    node_ids,
    only_records,
    require_record,
)
from fedguard.privacy.secagg.identity import IDENTITY_KEY_BYTES, SIGNATURE_BYTES
from fedguard.privacy.secagg.params import GRAPH_NONCE_BYTES, SEED_COMMITMENT_BYTES

# One survivor's mask partners, comma-separated node ids (20 digits + comma each).
MAX_PARTNER_LIST_BYTES = 21 * MAX_PEERS
# Fields of each SecAgg+ stage request (besides "stage"), as clients/secure_aggregation.py reads them.
COHORT_LIST = ("peers", "envelope_keys", "mask_keys", "identity_keys", "signatures", "seed_commitments",
               "nonce_commitments")
STAGE_FIELDS = {
    "cohort": ("round", "session", *COHORT_LIST),
    "share": ("round", "session", *COHORT_LIST, "nonces", "cohort_signatures"),
    "mask": ("round", "session", "from", "ciphertexts"),
    "consistency": ("round", "session", "survivors"),
    "unmask": ("round", "session", "survivors", "dropped", "signers", "signatures", "partner_nodes", "partner_lists",
               "partner_signatures"),
}


def _check_session(request: ConfigRecord, context: Context, stage: str) -> None:
    """The request is for the round and session this client's secure-aggregation state belongs to."""
    session = context.state[SESSION_STATE_KEY]
    server_round = count(request, "round", minimum=0)
    session_id = request.get("session")
    if not isinstance(session_id, bytes) or len(session_id) > protocol.SECAGG_SESSION_BYTES:
        raise MalformedMessage(f"'session' must be at most {protocol.SECAGG_SESSION_BYTES} bytes")
    if server_round != int(session["round"]) or session_id != bytes(session["session"]):
        raise MalformedMessage(
            f"{stage} request for round {server_round} of another session; this client's secure aggregation "
            f"session is round {int(session['round'])} (a replayed or reordered request)"
        )


def check_stage_request(msg: Message, context: Context) -> None:
    """Refuse a malformed, stale or replayed SecAgg+ stage request."""
    only_records(msg.content, {protocol.SECAGG_KEY})
    request = require_record(msg.content, protocol.SECAGG_KEY, ConfigRecord)
    stage = request.get("stage")
    fields = STAGE_FIELDS.get(stage) if isinstance(stage, str) else None
    if fields is None:
        raise MalformedMessage(f"unknown secure aggregation stage {stage!r:.40}; expected one of {list(STAGE_FIELDS)}")
    if set(request.keys()) != {"stage", *fields}:
        raise MalformedMessage(f"a {stage} request holds exactly the fields {['stage', *fields]}")
    if SESSION_STATE_KEY not in context.state:
        raise MalformedMessage(f"{stage} request, but this client has no secure aggregation session this round")
    _check_session(request, context, stage)
    if stage in ("cohort", "share"):
        peers = node_ids(request, "peers", MAX_PEERS)
        key_size = (PUBLIC_KEY_BYTES, PUBLIC_KEY_BYTES)
        keys = [byte_strings(request, field, MAX_PEERS, size=key_size) for field in ("envelope_keys", "mask_keys")]
        keys.append(byte_strings(request, "identity_keys", MAX_PEERS, size=(0, IDENTITY_KEY_BYTES)))
        keys.append(byte_strings(request, "signatures", MAX_PEERS, size=(0, SIGNATURE_BYTES)))
        for field in ("seed_commitments", "nonce_commitments"):
            keys.append(byte_strings(request, field, MAX_PEERS, size=(SEED_COMMITMENT_BYTES,) * 2))
        if stage == "share":
            keys.append(byte_strings(request, "nonces", MAX_PEERS, size=(GRAPH_NONCE_BYTES,) * 2))
            keys.append(byte_strings(request, "cohort_signatures", MAX_PEERS, size=(0, SIGNATURE_BYTES)))
        if len({len(peers), *(len(k) for k in keys)}) != 1:
            raise MalformedMessage(f"{', '.join(repr(f) for f in fields[2:])} must be equally long")
    elif stage == "mask":
        senders = node_ids(request, "from", MAX_PEERS)
        if len(senders) != len(byte_strings(request, "ciphertexts", MAX_PEERS, size=(1, MAX_SHARE_BYTES))):
            raise MalformedMessage("'from' and 'ciphertexts' must be equally long")
        if INPUT_STATE_KEY not in context.state:
            raise MalformedMessage("mask request, but this client holds no input for the round")
    elif stage == "consistency":
        node_ids(request, "survivors", MAX_PEERS)
    else:
        node_ids(request, "survivors", MAX_PEERS)
        node_ids(request, "dropped", MAX_PEERS)
        signers = node_ids(request, "signers", MAX_PEERS)
        if len(signers) != len(byte_strings(request, "signatures", MAX_PEERS, size=(SIGNATURE_BYTES, SIGNATURE_BYTES))):
            raise MalformedMessage("'signers' and 'signatures' must be equally long")
        listed = node_ids(request, "partner_nodes", MAX_PEERS)
        lists = byte_strings(request, "partner_lists", MAX_PEERS, size=(0, MAX_PARTNER_LIST_BYTES))
        partner_signatures = byte_strings(request, "partner_signatures", MAX_PEERS, size=(SIGNATURE_BYTES, SIGNATURE_BYTES))
        if not len(listed) == len(lists) == len(partner_signatures):
            raise MalformedMessage("'partner_nodes', 'partner_lists' and 'partner_signatures' must be equally long")
        for data in lists:
            try:
                protocol.partner_list_from_bytes(data)
            except (UnicodeDecodeError, ValueError):
                raise MalformedMessage("a 'partner_lists' entry is not a comma-separated list of node ids") from None


def secure_aggregation_stage(msg: Message, context: Context) -> Message:
    """SecAgg+ stages 1-3 (cohort, share, mask, consistency, unmask); stage 0 rides on the train reply."""
    check_stage_request(msg, context)
    return handle_stage(msg, context)
