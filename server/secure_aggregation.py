"""Server side of SecAgg+: runs the protocol stages after the train messages go out and
hands the strategy one aggregate reply, so any averaging strategy works unchanged.

The aggregate reply carries the global model plus the weighted mean update of the
clients that completed the round, and ``num-examples`` = their total weight; FedAvg of
that single reply is exactly the weighted FedAvg of the hidden updates, and FedProx,
FedAdam, FedYogi and FedAdagrad apply their server step to it as usual.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedguard.clients.wire import protocol
from fedguard.clients.secure_aggregation import COHORT_FIELDS, params_from
from fedguard.clients.wire.arrays import array_view
from fedguard.conf.plans import uses_adaptive_clipping
from fedguard.privacy.secagg.masking import dequantize_sum, levels_for
from fedguard.privacy.secagg.params import cohort_digest, graph_seed, nonce_commitment
from fedguard.privacy.secagg.protocol import SecAggError, ServerSession, neighbour_graph
from fedguard.server.federation import TrainReplies, exchange_messages, sort_train_replies
from fedguard.server.reply_checks import stage_reply_problem
from fedguard.server.reply_wait import send_and_collect

logger = logging.getLogger(__name__)

# Seconds between checks for stage answers when no config says otherwise (Flower's own is 0.1).
DEFAULT_POLL_INTERVAL = 0.01


def _stage_messages(requests: dict[int, ConfigRecord]) -> list[Message]:
    return [
        Message(RecordDict({protocol.SECAGG_KEY: request}), dst_node_id=node, message_type=protocol.SECAGG_MESSAGE_TYPE)
        for node, request in requests.items()
    ]


def _answers(
    grid: Grid,
    requests: dict[int, ConfigRecord],
    timeout: float,
    stage: str,
    vector_length: int | None = None,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
) -> dict[int, Message]:
    if not requests:
        return {}
    started = time.perf_counter()
    replies = send_and_collect(grid, _stage_messages(requests), timeout, poll_interval)
    logger.debug("secagg stage %s: %d round trip(s) took %.3f s", stage, len(requests), time.perf_counter() - started)
    answers = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning("secure aggregation %s: client node %d dropped: %s", stage, node, reply.error.reason)
        elif (problem := stage_reply_problem(stage, reply, vector_length)) is not None:
            logger.warning("secure aggregation %s: client node %d dropped: malformed answer: %s", stage, node, problem)
        else:
            answers[node] = reply
    missing = set(requests) - set(answers)
    if missing:
        logger.warning("secure aggregation %s: %d client(s) dropped out", stage, len(missing))
    return answers


def _rejected_senders(mask_answers: dict[int, Message], inbox: dict[int, dict[int, bytes]]) -> dict[int, set[int]]:
    """Each masking client's rejected senders; a client naming one that sent it nothing counts as dropped."""
    rejected: dict[int, set[int]] = {}
    for node, reply in mask_answers.items():
        named = {int(n) for n in reply.content[protocol.SECAGG_REJECTED_KEY][protocol.SECAGG_REJECTED_FIELD]}
        if not named <= set(inbox.get(node, {})):
            logger.warning(
                "secure aggregation mask: client node %d dropped: it rejected shares it was never sent (%s)",
                node, sorted(named - set(inbox.get(node, {}))),
            )
            continue
        rejected[node] = named
    return rejected


def _partner_statement(mask_answer: Message) -> tuple[bytes, bytes]:
    """A survivor's signed mask-partner list, as its neighbours need it to reveal its seed share."""
    record = mask_answer.content[protocol.SECAGG_REJECTED_KEY]
    listed = protocol.partner_list_bytes([int(n) for n in record[protocol.SECAGG_PARTNERS_FIELD]])
    return listed, bytes(record[protocol.SECAGG_PARTNERS_SIGNATURE_FIELD])


def check_summands(count: int, max_clients: int) -> None:
    """Refuse to unmask a sum of more inputs than the quantization levels leave room for (it may have wrapped)."""
    if count > max_clients:
        raise SecAggError(
            f"{count} inputs in the sum, but the quantization levels assume at most {max_clients} "
            f"(simulation.num_clients); the sum may have wrapped"
        )


class SecureAggregationExchange:
    """One training round's message exchange under SecAgg+."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.params = params_from(cfg)
        self.levels = levels_for(self.params.modulus_bits, int(cfg.simulation.num_clients))
        self.stage_timeout = float(cfg.secure_agg.stage_timeout)
        self.poll_interval = float(cfg.secure_agg.get("stage_poll_interval", DEFAULT_POLL_INTERVAL))
        # Client-level DP's adaptive clipping: each masked input holds the client's clip indicator after the update.
        self.extra = 1 if uses_adaptive_clipping(cfg) else 0

    @staticmethod
    def new_session_id() -> bytes:
        """A fresh random id per round's protocol run (replaceable where a test replays one session)."""
        return secrets.token_bytes(protocol.SECAGG_SESSION_BYTES)

    def train(
        self, grid: Grid, messages: Iterable[Message], global_arrays: ArrayRecord, server_round: int, timeout: float
    ) -> tuple[int, TrainReplies]:
        outgoing = list(messages)
        # A fresh id for this run of the protocol: sites sign it with their round keys.
        session_id = self.new_session_id()
        for message in outgoing:
            message.content[protocol.CONFIG_KEY][protocol.SECAGG_SESSION_KEY] = session_id
        started = time.perf_counter()
        sampled, replies = exchange_messages(grid, outgoing, timeout)
        logger.debug("round %d: secagg stage train+advertise took %.3f s", server_round, time.perf_counter() - started)
        instructions = {message.metadata.dst_node_id: message for message in outgoing}
        sorted_replies = sort_train_replies(server_round, replies)
        keyed = {r.metadata.src_node_id: r for r in sorted_replies.usable if protocol.SECAGG_KEY in r.content}
        try:
            aggregate = self._run_stages(grid, keyed, instructions, global_arrays, server_round, session_id)
        except (SecAggError, ValueError) as err:  # ValueError: junk shares from a client (Shamir, X25519)
            logger.error("round %d: secure aggregation failed: %s", server_round, err)
            sorted_replies.usable, sorted_replies.contributors = [], 0
            return sampled, sorted_replies
        sorted_replies.usable = [aggregate[0]]
        sorted_replies.contributors = aggregate[1]
        return sampled, sorted_replies

    def _run_stages(
        self,
        grid: Grid,
        keyed: dict[int, Message],
        instructions: dict[int, Message],
        global_arrays: ArrayRecord,
        server_round: int,
        session_id: bytes,
    ) -> tuple[Message, int]:
        vector_length = 1 + self.extra + sum(int(np.prod(global_arrays[key].shape)) for key in global_arrays.keys())
        total, count, survivors = self.masked_sum(grid, keyed, server_round, session_id, vector_length)
        started = time.perf_counter()
        content = self._aggregate_content(total, count, survivors, keyed, global_arrays)
        logger.debug("round %d: secagg dequantization took %.3f s", server_round, time.perf_counter() - started)
        # Shaped as the reply to one survivor's train message; strategies read only its content.
        return Message(content, reply_to=instructions[min(survivors)]), count

    def masked_sum(
        self, grid: Grid, keyed: dict[int, Message], server_round: int, session_id: bytes, vector_length: int
    ) -> tuple[np.ndarray, int, set[int]]:
        """Stages 1-3 after the sites' adverts (``keyed``: node -> its stage-0 reply): the integer sum
        of the survivors' held inputs of ``vector_length`` entries, how many were summed, and who.

        The input is whatever each site holds for this session: a training update (train) or its
        statistics vector (federated preprocessing, server/preprocessing.py)."""
        self.params.validate(max(len(keyed), 2))
        if len(keyed) < self.params.threshold:
            raise SecAggError(f"{len(keyed)} clients trained; threshold is {self.params.threshold}")
        advertised = {
            node: (bytes(r.content[protocol.SECAGG_KEY]["envelope_key"]), bytes(r.content[protocol.SECAGG_KEY]["mask_key"]))
            for node, r in keyed.items()
        }
        signed = {
            node: tuple(bytes(r.content[protocol.SECAGG_KEY][f])
                        for f in ("identity_key", "signature", "seed_commitment", "nonce_commitment"))
            for node, r in keyed.items()
        }
        # Commit-and-reveal graph (privacy/secagg/params.py::graph_seed): the cohort list goes out
        # first, each site fixes it and reveals its graph nonce; the seed needs every listed
        # site's nonce, so the list is chosen before any nonce is known and cannot be changed after.
        cohort = {node: (*advertised[node], *signed[node]) for node in advertised}
        listing = {
            "round": server_round,
            "session": session_id,
            "peers": sorted(cohort),
            **{field: [cohort[n][i] for n in sorted(cohort)] for i, field in enumerate(COHORT_FIELDS)},
        }
        cohort_answers = _answers(grid, {node: ConfigRecord({"stage": "cohort", **listing}) for node in cohort},
                                  self.stage_timeout, "cohort", poll_interval=self.poll_interval)
        nonces = {node: bytes(r.content[protocol.SECAGG_KEY]["nonce"]) for node, r in cohort_answers.items()
                  if nonce_commitment(bytes(r.content[protocol.SECAGG_KEY]["nonce"])) == signed[node][3]}
        # Each site's signature on the list it was shown; every site checks all of them at the share stage.
        cohort_signatures = {node: bytes(r.content[protocol.SECAGG_KEY]["cohort_signature"])
                             for node, r in cohort_answers.items()}
        if set(nonces) != set(cohort):
            # Leaving a site out now would let the server pick among graphs it has already seen.
            raise SecAggError(f"graph nonce missing or not matching its commitment from {sorted(set(cohort) - set(nonces))}; "
                              f"the graph cannot be drawn without every listed site's nonce")
        seed = graph_seed(cohort_digest(server_round, session_id, cohort), nonces)
        graph = neighbour_graph(list(advertised), self.params.neighbours, seed=seed)
        session = ServerSession(self.params, server_round, graph)
        session.route_keys(advertised)
        session.seed_commitments = {node: signed[node][2] for node in signed}
        share_request = ConfigRecord({"stage": "share", **listing, "nonces": [nonces[n] for n in sorted(cohort)],
                                      "cohort_signatures": [cohort_signatures[n] for n in sorted(cohort)]})
        share_answers = _answers(
            grid,
            {node: share_request for node in cohort},
            self.stage_timeout,
            "share",
            poll_interval=self.poll_interval,
        )
        shares = {
            node: {
                int(to): bytes(c)
                for to, c in zip(r.content[protocol.SECAGG_KEY]["to"], r.content[protocol.SECAGG_KEY]["ciphertexts"], strict=True)
            }
            for node, r in share_answers.items()
        }
        inbox = session.route_shares(shares)
        mask_answers = _answers(
            grid,
            {
                node: ConfigRecord({"stage": "mask", "round": server_round, "session": session_id, "from": list(received),
                                    "ciphertexts": list(received.values())})
                for node, received in inbox.items()
            },
            self.stage_timeout,
            "mask",
            vector_length,
            poll_interval=self.poll_interval,
        )
        rejected = _rejected_senders(mask_answers, inbox)
        survivors, masked_with = session.settle(set(rejected), inbox, rejected)
        for node in sorted(set(rejected) - survivors):
            accusers = sorted(peer for peer, senders in rejected.items() if node in senders)
            logger.warning(
                "round %d: secure aggregation: client node %d left out of this round's sum: its shares to %s "
                "failed authentication or never arrived",
                server_round, node, accusers or "some neighbours",
            )
        masked = {node: array_view(mask_answers[node].content[protocol.SECAGG_KEY]["masked"]) for node in survivors}
        dropped = set(shares) - survivors
        if len(survivors) < self.params.threshold:
            raise SecAggError(f"{len(survivors)} clients sent masked inputs; threshold is {self.params.threshold}")
        check_summands(len(survivors), int(self.cfg.simulation.num_clients))
        # Consistency round: every survivor signs the survivor set; each unmasks only on seeing
        # at least `threshold` of its neighbours' signatures on that same set.
        consistency_answers = _answers(
            grid,
            {
                node: ConfigRecord({"stage": "consistency", "round": server_round, "session": session_id,
                                    "survivors": sorted(survivors)})
                for node in survivors
            },
            self.stage_timeout,
            "consistency",
            poll_interval=self.poll_interval,
        )
        signed = {n: bytes(r.content[protocol.SECAGG_KEY]["signature"]) for n, r in consistency_answers.items()}
        partners = {node: _partner_statement(mask_answers[node]) for node in survivors}
        unmask_answers = _answers(
            grid,
            {  # each survivor gets its neighbours' signatures and signed mask-partner lists (the only ones it can check)
                node: ConfigRecord({"stage": "unmask", "round": server_round, "session": session_id,
                                    "survivors": sorted(survivors), "dropped": sorted(dropped),
                                    "signers": sorted(graph[node] & set(signed)),
                                    "signatures": [signed[n] for n in sorted(graph[node] & set(signed))],
                                    "partner_nodes": sorted(graph[node] & survivors),
                                    "partner_lists": [partners[n][0] for n in sorted(graph[node] & survivors)],
                                    "partner_signatures": [partners[n][1] for n in sorted(graph[node] & survivors)]})
                for node in consistency_answers
            },
            self.stage_timeout,
            "unmask",
            poll_interval=self.poll_interval,
        )
        revealed = {
            node: {
                int(peer): (str(kind), bytes(share))
                for peer, kind, share in zip(
                    r.content[protocol.SECAGG_KEY]["for"],
                    r.content[protocol.SECAGG_KEY]["kinds"],
                    r.content[protocol.SECAGG_KEY]["shares"],
                    strict=True,
                )
            }
            for node, r in unmask_answers.items()
        }
        started = time.perf_counter()
        total, count = session.aggregate(masked, set(shares), revealed, masked_with)
        logger.debug("round %d: secagg unmasking took %.3f s", server_round, time.perf_counter() - started)
        return total, count, survivors

    def _aggregate_content(
        self,
        total: np.ndarray,
        count: int,
        survivors: set[int],
        keyed: dict[int, Message],
        global_arrays: ArrayRecord,
    ) -> RecordDict:
        sa = self.cfg.secure_agg
        weighted_sum = dequantize_sum(total[:-1], count, sa.clip_range * sa.max_weight, self.levels)
        total_weight = float(dequantize_sum(total[-1:], count, float(sa.max_weight), self.levels)[0])
        if total_weight <= 0:
            raise SecAggError(f"the unmasked total weight is {total_weight}; the aggregate is unusable")
        model_size = weighted_sum.size - self.extra
        mean_update = weighted_sum[:model_size] / total_weight
        arrays, offset = {}, 0
        for key in global_arrays.keys():
            base = array_view(global_arrays[key])
            size = base.size
            arrays[key] = Array((base.astype(np.float64) + mean_update[offset : offset + size].reshape(base.shape)).astype(base.dtype))
            offset += size
        metrics = [keyed[node].content[protocol.METRICS_KEY] for node in survivors]
        weights = [float(m[protocol.NUM_EXAMPLES_KEY]) for m in metrics]
        loss = sum(w * float(m[protocol.TRAIN_LOSS_KEY]) for w, m in zip(weights, metrics)) / sum(weights)
        content = RecordDict(
            {
                protocol.ARRAYS_KEY: ArrayRecord(arrays),
                protocol.METRICS_KEY: MetricRecord({protocol.NUM_EXAMPLES_KEY: sum(weights), protocol.TRAIN_LOSS_KEY: loss}),
            }
        )
        if self.extra:  # the sum of the clip indicators, for server/client_dp.py
            content[protocol.CLIP_INDICATOR_KEY] = ConfigRecord({protocol.CLIP_INDICATOR_FIELD: float(weighted_sum[model_size])})
        return content
