"""Checks every client reply must pass before the server uses any of it.

A federation spans sites nobody fully controls. A training reply with NaN/Inf, the wrong
arrays, shapes or dtypes, a missing, negative or absurd example count, extra or missing
records, or a malformed privacy report is rejected with a reason, so the global model,
the run record and the accounting never see it. Evaluation replies and the answers of
each SecAgg+ stage get the same treatment. Flower's strategies raise on replies whose
records or metric keys differ from each other's; the checks here make sure none reach them.

Under secure aggregation the server sees no single update: it can check only the form
of each stage's answer (types, lengths, key sizes). Values inside the masked sum, a
client's clipping and quantization, and the honesty of revealed shares are not
checkable by the server; the client's own checks and the protocol's authentication are
what stop those.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedguard.clients.wire import protocol
from fedguard.clients.wire.checks import (
    MAX_EXAMPLE_COUNT,
    MAX_PEERS,
    MAX_SHARE_BYTES,
    PUBLIC_KEY_BYTES,
    MalformedMessage,
    byte_strings,
    count,
    decode_array,
    decode_arrays,
    finite_number,
    layout_of,
    node_ids,
    number,
    only_records,
    require_record,
    text,
    typed_list,
)
from fedguard.privacy.secagg.identity import IDENTITY_KEY_BYTES, SIGNATURE_BYTES
from fedguard.privacy.secagg.params import GRAPH_NONCE_BYTES, SEED_COMMITMENT_BYTES

logger = logging.getLogger(__name__)

TRAIN_METRIC_KEYS = {protocol.NUM_EXAMPLES_KEY, protocol.TRAIN_LOSS_KEY, protocol.TRAIN_STEPS_KEY}
EVAL_METRIC_KEYS = {protocol.NUM_EXAMPLES_KEY, protocol.EVAL_LOSS_KEY, protocol.EVAL_ACCURACY_KEY}
REFUSED_KEY = "refused"
REASON_KEY = "reason"
# A client's privacy report (clients/private_training.py): every field, and its type.
PRIVACY_NUMBERS = ("epsilon", "delta", "noise_multiplier", "sample_rate", "budget_epsilon")
PRIVACY_COUNTS = ("steps_round", "steps_total", "rounds_participated", protocol.PARTITION_ID_KEY)
PRIVACY_TEXTS = ("accountant", REASON_KEY)
PRIVACY_REPORT_KEYS = {*PRIVACY_NUMBERS, *PRIVACY_COUNTS, *PRIVACY_TEXTS, REFUSED_KEY}
# A budget refusal also says what the refused round would have cost.
REFUSAL_EXTRA_KEYS = {"planned_steps", "epsilon_if_trained"}
# The site's signed ledger entries (clients/site_state.py); signatures are checked by server/privacy_ledger.py.
LEDGER_ENTRIES_FIELD = protocol.LEDGER_ENTRIES_FIELD
MAX_LEDGER_ENTRIES = 100_000
MAX_LEDGER_ENTRY_CHARS = 8_000
MAX_TEXT_CHARS = 1000
SECAGG_STAGES = ("cohort", "share", "mask", "consistency", "unmask")
SHARE_KINDS = ("seed", "key")
MASKED_ARRAY = "masked"
# A plain reply's clip indicator b - 1/2 (adaptive clipping, central noise): exactly one of these.
CLIP_INDICATOR_VALUES = (-0.5, 0.5)


def _privacy_report(content) -> ConfigRecord | None:
    if protocol.PRIVACY_KEY not in content:
        return None
    report = require_record(content, protocol.PRIVACY_KEY, ConfigRecord)
    present = set(report.keys()) - (REFUSAL_EXTRA_KEYS if report.get(REFUSED_KEY) is True else set())
    if present != PRIVACY_REPORT_KEYS:
        missing, extra = PRIVACY_REPORT_KEYS - present, present - PRIVACY_REPORT_KEYS
        raise MalformedMessage(f"privacy report lacks {sorted(missing)} / has unknown {sorted(extra)}")
    for key in PRIVACY_NUMBERS:
        if math.isnan(number(report, key)):
            raise MalformedMessage(f"privacy report '{key}' is NaN")
    for key in PRIVACY_COUNTS:
        count(report, key, minimum=0)
    for key in PRIVACY_TEXTS:
        if len(text(report, key)) > MAX_TEXT_CHARS:
            raise MalformedMessage(f"privacy report '{key}' is longer than {MAX_TEXT_CHARS} characters")
    if not isinstance(report[REFUSED_KEY], bool):
        raise MalformedMessage(f"privacy report '{REFUSED_KEY}' must be a bool")
    for key in REFUSAL_EXTRA_KEYS & set(report.keys()):
        if math.isnan(number(report, key)):
            raise MalformedMessage(f"privacy report '{key}' is NaN")
    return report


def _ledger_entries(content) -> None:
    if protocol.LEDGER_KEY not in content:
        return
    record = require_record(content, protocol.LEDGER_KEY, ConfigRecord)
    if set(record.keys()) != {LEDGER_ENTRIES_FIELD, protocol.LEDGER_PUBLIC_KEY_FIELD}:
        raise MalformedMessage(f"ledger record must hold exactly '{LEDGER_ENTRIES_FIELD}' and '{protocol.LEDGER_PUBLIC_KEY_FIELD}'")
    if len(text(record, protocol.LEDGER_PUBLIC_KEY_FIELD)) > MAX_LEDGER_ENTRY_CHARS:
        raise MalformedMessage("ledger public key is too long")
    entries = record[LEDGER_ENTRIES_FIELD]
    if not isinstance(entries, list) or len(entries) > MAX_LEDGER_ENTRIES:
        raise MalformedMessage(f"ledger '{LEDGER_ENTRIES_FIELD}' must be a list of at most {MAX_LEDGER_ENTRIES} entries")
    if any(not isinstance(entry, str) or len(entry) > MAX_LEDGER_ENTRY_CHARS for entry in entries):
        raise MalformedMessage(f"ledger entries must be strings of at most {MAX_LEDGER_ENTRY_CHARS} characters")


def _example_count(metrics: MetricRecord) -> int:
    value = metrics.get(protocol.NUM_EXAMPLES_KEY)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedMessage(f"'{protocol.NUM_EXAMPLES_KEY}' is missing or not a number")
    if not math.isfinite(value) or not 0 < value <= MAX_EXAMPLE_COUNT or not float(value).is_integer():
        raise MalformedMessage(f"'{protocol.NUM_EXAMPLES_KEY}'={value} is not a positive count")
    return int(value)


def _train_metrics(content) -> None:
    metrics = require_record(content, protocol.METRICS_KEY, MetricRecord)
    _example_count(metrics)
    if unknown := set(metrics.keys()) - TRAIN_METRIC_KEYS:
        raise MalformedMessage(f"unknown training metrics {sorted(unknown)}")
    # NaN is what a round without a single non-empty batch reports (Poisson sampling); inf is not.
    if math.isinf(number(metrics, protocol.TRAIN_LOSS_KEY)):
        raise MalformedMessage(f"'{protocol.TRAIN_LOSS_KEY}' is infinite")
    if protocol.TRAIN_STEPS_KEY in metrics:
        count(metrics, protocol.TRAIN_STEPS_KEY, minimum=0)


def _clip_indicator(content) -> None:
    if protocol.CLIP_INDICATOR_KEY not in content:
        return
    record = require_record(content, protocol.CLIP_INDICATOR_KEY, ConfigRecord)
    if list(record.keys()) != [protocol.CLIP_INDICATOR_FIELD]:
        raise MalformedMessage(f"clip indicator record must hold exactly '{protocol.CLIP_INDICATOR_FIELD}'")
    if number(record, protocol.CLIP_INDICATOR_FIELD) not in CLIP_INDICATOR_VALUES:
        raise MalformedMessage(f"clip indicator must be one of {CLIP_INDICATOR_VALUES} (clipped, within the clip norm)")


def _advertised_keys(content) -> None:
    record = require_record(content, protocol.SECAGG_KEY, ConfigRecord)
    fields = {"stage", "envelope_key", "mask_key", "identity_key", "signature", "seed_commitment", "nonce_commitment"}
    if set(record.keys()) != fields or record.get("stage") != "advertise":
        raise MalformedMessage(f"secure aggregation record must be stage=advertise with {sorted(fields - {'stage'})}")
    for key in ("envelope_key", "mask_key"):
        value = record[key]
        if not isinstance(value, bytes) or len(value) != PUBLIC_KEY_BYTES:
            raise MalformedMessage(f"secure aggregation '{key}' must be {PUBLIC_KEY_BYTES} bytes")
    # Unsigned (empty) or an Ed25519 key and signature; only the peers, holding the roster, can verify them.
    for key in ("seed_commitment", "nonce_commitment"):
        commitment = record[key]
        if not isinstance(commitment, bytes) or len(commitment) != SEED_COMMITMENT_BYTES:
            raise MalformedMessage(f"secure aggregation '{key}' must be {SEED_COMMITMENT_BYTES} bytes")
    for key, size in (("identity_key", IDENTITY_KEY_BYTES), ("signature", SIGNATURE_BYTES)):
        value = record[key]
        if not isinstance(value, bytes) or len(value) not in (0, size):
            raise MalformedMessage(f"secure aggregation '{key}' must be empty or {size} bytes")


def _check_train_reply(content, expected_arrays: ArrayRecord | None) -> None:
    secure = expected_arrays is None
    report = _privacy_report(content)
    _ledger_entries(content)
    if report is not None and report[REFUSED_KEY]:
        only_records(content, {protocol.PRIVACY_KEY, protocol.LEDGER_KEY})  # a budget refusal carries nothing else
        return
    # Under SecAgg+ the clip indicator travels masked, never in the clear: a reply showing it is refused.
    plain_only = {protocol.ARRAYS_KEY, protocol.CLIP_INDICATOR_KEY}
    only_records(
        content,
        {protocol.METRICS_KEY, protocol.PRIVACY_KEY, protocol.LEDGER_KEY, *({protocol.SECAGG_KEY} if secure else plain_only)},
    )
    _train_metrics(content)
    if secure:
        if protocol.SECAGG_KEY in content:
            _advertised_keys(content)
        return
    decode_arrays(content.get(protocol.ARRAYS_KEY), layout_of(expected_arrays))
    _clip_indicator(content)


def train_reply_problem(reply: Message, expected_arrays: ArrayRecord | None) -> str | None:
    """Why this reply must not be used, or None when it may (a budget refusal is usable as a refusal).

    ``expected_arrays`` is None where the reply carries no model (secure aggregation).
    """
    try:
        _check_train_reply(reply.content, expected_arrays)
    except MalformedMessage as err:
        return str(err)
    return None


def metric_key_outliers(replies: list[Message]) -> list[Message]:
    """Replies whose metric keys differ from the most common set; Flower refuses to aggregate a mix."""
    if len(replies) < 2:
        return []
    keys = [frozenset(reply.content[protocol.METRICS_KEY].keys()) for reply in replies]
    ranked = Counter(keys).most_common()
    majority = max((key for key, n in ranked if n == ranked[0][1]), key=lambda key: (len(key), sorted(key)))
    return [reply for reply, key in zip(replies, keys) if key != majority]


def evaluate_reply_problem(reply: Message) -> str | None:
    """Why this evaluation reply must not be averaged, or None."""
    try:
        only_records(reply.content, {protocol.METRICS_KEY})
        metrics = require_record(reply.content, protocol.METRICS_KEY, MetricRecord)
        if set(metrics.keys()) != EVAL_METRIC_KEYS:
            raise MalformedMessage(f"evaluation metrics must be exactly {sorted(EVAL_METRIC_KEYS)}")
        _example_count(metrics)
        finite_number(metrics, protocol.EVAL_LOSS_KEY, 0.0, math.inf)
        finite_number(metrics, protocol.EVAL_ACCURACY_KEY, 0.0, 1.0)
    except MalformedMessage as err:
        return str(err)
    return None


def usable_evaluate_replies(server_round: int, replies: list[Message]) -> list[Message]:
    """The evaluation replies that may be averaged; one log line for each one that may not."""
    usable = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning("round %d: evaluation on client node %d failed: %s", server_round, node, reply.error.reason)
        elif (problem := evaluate_reply_problem(reply)) is not None:
            logger.warning("round %d: rejected the evaluation reply of client node %d: %s", server_round, node, problem)
        else:
            usable.append(reply)
    return usable


def _check_stage_answer(stage: str, content, vector_length: int | None) -> None:
    if stage == "mask":
        only_records(content, {protocol.SECAGG_KEY, protocol.SECAGG_REJECTED_KEY})
        record = require_record(content, protocol.SECAGG_KEY, ArrayRecord)
        if list(record.keys()) != [MASKED_ARRAY]:
            raise MalformedMessage(f"a mask answer holds exactly one array '{MASKED_ARRAY}'")
        array = record[MASKED_ARRAY]
        length = vector_length if vector_length is not None else (tuple(array.shape) or (0,))[0]
        decode_array(MASKED_ARRAY, array, (length,), np.uint64)
        rejected = require_record(content, protocol.SECAGG_REJECTED_KEY, ConfigRecord)
        node_ids(rejected, protocol.SECAGG_REJECTED_FIELD, MAX_PEERS)
        node_ids(rejected, protocol.SECAGG_PARTNERS_FIELD, MAX_PEERS)
        signature = rejected.get(protocol.SECAGG_PARTNERS_SIGNATURE_FIELD)
        fields = {protocol.SECAGG_REJECTED_FIELD, protocol.SECAGG_PARTNERS_FIELD, protocol.SECAGG_PARTNERS_SIGNATURE_FIELD}
        if set(rejected.keys()) != fields or not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
            raise MalformedMessage(
                f"a mask answer's record holds exactly {sorted(fields)} (the partners signature: {SIGNATURE_BYTES} bytes)"
            )
        return
    only_records(content, {protocol.SECAGG_KEY})
    record = require_record(content, protocol.SECAGG_KEY, ConfigRecord)
    if stage == "cohort":
        nonce, signature = record.get("nonce"), record.get("cohort_signature")
        if (set(record.keys()) != {"nonce", "cohort_signature"} or not isinstance(nonce, bytes)
                or len(nonce) != GRAPH_NONCE_BYTES or not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES):
            raise MalformedMessage(f"a cohort answer holds one {GRAPH_NONCE_BYTES}-byte 'nonce' and one "
                                   f"{SIGNATURE_BYTES}-byte 'cohort_signature' only")
    elif stage == "share":
        peers = node_ids(record, "to", MAX_PEERS)
        ciphertexts = byte_strings(record, "ciphertexts", MAX_PEERS, size=(1, MAX_SHARE_BYTES))
        if set(record.keys()) != {"to", "ciphertexts"} or len(peers) != len(ciphertexts):
            raise MalformedMessage("a share answer holds equally long 'to' and 'ciphertexts' lists only")
    elif stage == "consistency":
        signature = record.get("signature")
        if set(record.keys()) != {"signature"} or not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
            raise MalformedMessage(f"a consistency answer holds one '{SIGNATURE_BYTES}'-byte 'signature' only")
    elif stage == "unmask":
        peers = node_ids(record, "for", MAX_PEERS)
        kinds = typed_list(record, "kinds", str, MAX_PEERS)
        shares = byte_strings(record, "shares", MAX_PEERS, size=(1, MAX_SHARE_BYTES))
        if set(record.keys()) != {"for", "kinds", "shares"} or not len(peers) == len(kinds) == len(shares):
            raise MalformedMessage("an unmask answer holds equally long 'for', 'kinds' and 'shares' lists only")
        if any(kind not in SHARE_KINDS for kind in kinds):
            raise MalformedMessage(f"share kinds must be one of {SHARE_KINDS}")
    else:
        raise MalformedMessage(f"unknown secure aggregation stage {stage!r}")


def stage_reply_problem(stage: str, reply: Message, vector_length: int | None = None) -> str | None:
    """Why a SecAgg+ stage answer cannot be used (the client then counts as dropped), or None.

    ``vector_length`` is the length every masked input must have (model size + 1 weight).
    """
    try:
        _check_stage_answer(stage, reply.content, vector_length)
    except MalformedMessage as err:
        return str(err)
    return None
