"""The server's side of federated preprocessing: ask every site once, add their sums, publish
the statistics every site then preprocesses with.

Runs before round 1 (after the ledger is open, so each site's signed release is embedded
before its sums are used). Under sample-level DP each site's vector is already noised and
accounted by the site (clients/preprocessing.py). With SecAgg+ off the server sees each
site's vector as released; with it on the vectors travel as SecAgg+ inputs (the run's round
0, the same protocol and dropout handling as a training round, server/secure_aggregation.py)
and the server learns only the sum of the surviving sites' vectors. The result goes into the
run's config as ``dataset.statistics``: every later message carries it, and so does every
checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedguard.clients.preprocessing import (
    PREPROCESSING_ROUND,
    contract_layout,
    masked_statistics_bound,
    masks_statistics,
    statistics_levels,
)
from fedguard.clients.wire import protocol
from fedguard.conf.contract import ImageContract, declared_contract_of
from fedguard.privacy.preprocessing import (
    PreprocessingError,
    Statistics,
    SumsLayout,
    decode_statistics,
    statistics_from_sums,
)
from fedguard.privacy.secagg.protocol import SecAggError
from fedguard.server.secure_aggregation import SecureAggregationExchange

logger = logging.getLogger(__name__)

STATISTICS_FILE = "preprocessing.json"


class PreprocessingFailed(RuntimeError):
    """No site released usable statistics: training would have nothing to standardise with."""


@dataclass
class PreprocessingOutcome:
    statistics: dict[str, Any]
    seconds: float
    sites: int
    failures: dict[int, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"mode": "federated", "seconds": round(self.seconds, 3), "sites": self.sites,
                "failures": {str(node): why for node, why in self.failures.items()}, "statistics": self.statistics}


def statistics_record(stats: Statistics, cfg: DictConfig, sites: int) -> dict[str, Any]:
    """``dataset.statistics`` as plain YAML-able numbers, by feature name."""
    contract = declared_contract_of(cfg.dataset)
    out: dict[str, Any] = {"source": "federated", "sites": sites, "count": stats.count}
    if isinstance(contract, ImageContract):
        out["pixels"] = {"mean": stats.means[0], "std": stats.stds[0]}
        return out
    numeric = [f.name for f in contract.features if f.kind == "numeric"]
    out["features"] = {name: {"mean": m, "std": s} for name, m, s in zip(numeric, stats.means, stats.stds)}
    counted = [f for f in contract.features if f.kind == "categorical" and f.frequencies]
    out["frequencies"] = {f.name: dict(zip(f.categories, freq)) for f, freq in zip(counted, stats.frequencies)}
    return out


def _sums_of(reply: Message, length: int) -> np.ndarray:
    record = reply.content.config_records.get(protocol.PREPROCESS_KEY)
    if record is None:
        raise PreprocessingError("the reply carries no preprocessing record")
    sums = np.asarray(record[protocol.PREPROCESS_SUMS_FIELD], dtype=np.float64)
    if sums.shape != (length,) or not np.all(np.isfinite(sums)):
        raise PreprocessingError(f"sums of shape {sums.shape} (finite: {bool(np.all(np.isfinite(sums)))}); "
                                 f"the contract's layout has {length}")
    return sums


def _clear_sum(answered: list[Message], length: int, failures: dict[int, str]) -> tuple[np.ndarray, int]:
    """SecAgg+ off: each site's vector arrives as released; add the usable ones."""
    total = np.zeros(length)
    used = 0
    for reply in answered:
        try:
            total += _sums_of(reply, length)
            used += 1
        except (PreprocessingError, KeyError, TypeError, ValueError) as err:
            failures[reply.metadata.src_node_id] = f"unusable statistics: {err}"
    return total, used


def _masked_sum(exchange: SecureAggregationExchange, grid: Grid, answered: list[Message], session_id: bytes,
                cfg: DictConfig, layout: SumsLayout, failures: dict[int, str]) -> tuple[np.ndarray, int]:
    """SecAgg+ on: the answers are the sites' adverts; run the protocol's stages on the vectors they
    hold and decode the unmasked sum (off by at most one quantisation step per site and coordinate)."""
    keyed = {}
    for reply in answered:
        if protocol.SECAGG_KEY in reply.content:
            keyed[reply.metadata.src_node_id] = reply
        else:
            failures[reply.metadata.src_node_id] = "unusable statistics: no secure-aggregation advert"
    try:
        total, used, survivors = exchange.masked_sum(grid, keyed, PREPROCESSING_ROUND, session_id, layout.length)
    except (SecAggError, ValueError) as err:  # ValueError: junk shares from a site (Shamir, X25519)
        raise PreprocessingFailed(f"secure aggregation of the statistics failed: {err}") from None
    failures.update({node: "dropped out of the secure aggregation of the statistics" for node in set(keyed) - survivors})
    total = decode_statistics(total, used, masked_statistics_bound(cfg, layout), statistics_levels(cfg))
    return total, used


def run_preprocessing(
    grid: Grid, cfg: DictConfig, config_yaml: str, lineage: str, timeout: float, record_ledgers=None
) -> PreprocessingOutcome:
    """Ask every connected site once for its sums; add them; return the federation's statistics.

    ``record_ledgers(round, replies)`` embeds the sites' signed entries and returns the replies
    whose ledger was unacceptable: their sums are not used."""
    started = time.perf_counter()
    layout, ranges = contract_layout(declared_contract_of(cfg.dataset))
    request = ConfigRecord({protocol.FEDGUARD_CONFIG_KEY: config_yaml, protocol.LINEAGE_KEY: lineage})
    exchange = SecureAggregationExchange(cfg) if masks_statistics(cfg) else None
    if exchange is not None:
        session_id = exchange.new_session_id()
        request[protocol.SECAGG_SESSION_KEY] = session_id
    nodes = sorted(grid.get_node_ids())
    messages = [
        Message(RecordDict({protocol.CONFIG_KEY: request}), dst_node_id=node, message_type=protocol.PREPROCESS_MESSAGE_TYPE)
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    failures: dict[int, str] = {}
    answered = [r for r in replies if not r.has_error()]
    failures.update({r.metadata.src_node_id: str(r.error.reason) for r in replies if r.has_error()})
    missing = set(nodes) - {r.metadata.src_node_id for r in replies}
    failures.update({node: f"no answer within {timeout:.0f} s" for node in missing})
    if record_ledgers is not None:
        rejected = {id(r) for r in record_ledgers(0, answered)}
        failures.update({r.metadata.src_node_id: "its privacy ledger is not acceptable" for r in answered if id(r) in rejected})
        answered = [r for r in answered if id(r) not in rejected]
    if exchange is None:
        total, used = _clear_sum(answered, layout.length, failures)
    else:
        total, used = _masked_sum(exchange, grid, answered, session_id, cfg, layout, failures)
    for node, why in failures.items():
        logger.warning("preprocessing: node %d sent no statistics: %s", node, why)
    if used == 0:
        raise PreprocessingFailed(f"no site released preprocessing statistics ({len(nodes)} asked): "
                                  + "; ".join(f"node {n}: {w}" for n, w in failures.items()))
    stats = statistics_from_sums(total, layout, ranges)
    seconds = time.perf_counter() - started
    logger.info("federated preprocessing: statistics from %d site(s) in %.2f s", used, seconds)
    return PreprocessingOutcome(statistics_record(stats, cfg, used), seconds, used, failures)
