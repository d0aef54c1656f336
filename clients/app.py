"""fedguard's ClientApp (Flower Message API): local training and evaluation on a site's data.

The run's config arrives with every message (the server is the one source of truth);
the site's own settings (partition, data path, device) come from the node config.
"""

from __future__ import annotations

import hashlib
import logging
import os
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from omegaconf import DictConfig, OmegaConf

from fedguard.clients.wire import protocol
from fedguard.clients.wire.arrays import numpy_array_record
from fedguard.clients.client_dp import ClipError, round_clip_norm
from fedguard.clients.datasets import DatasetError, LocalDataError, expected_layout, load_dataset
from fedguard.clients.wire.checks import (
    parse_run_config,
    MalformedMessage,
    count,
    decode_arrays,
    finite_number,
    only_records,
    require_record,
    text,
)
from fedguard.clients.models import build_model, model_from_state, resolve_device
from fedguard.clients.partition import PartitionError, partition_of, split_train_validation
from fedguard.clients.private_training import BudgetExhausted, build_trainer, training_commitments
from fedguard.clients.layers import run_layers
from fedguard.clients.releases import released_train_loss, resend_enters_a_new_sum, sends_local_metrics
from fedguard.clients.secagg_requests import secure_aggregation_stage
from fedguard.clients.own_files import own_examples
from fedguard.clients.preprocessing import PreprocessingRefused, preprocessing_stage
from fedguard.clients.simulation_mods import with_custom_model, with_site_data
from fedguard.clients.site import (
    DATA_KEY,
    PARTITION_ID_KEY,
    SECAGG_COLLUSION_FRACTION_KEY,
    SECAGG_ROSTER_KEY,
    STATE_DIR_KEY,
    SiteConfigError,
    SiteSettings,
    check_custom_model_allowed,
    read_site_settings,
)
from fedguard.clients.data_spend import data_fingerprint
from fedguard.clients.site_floor import check_site_floor, read_site_floor
from fedguard.clients.site_state import CachedReply, ResendRefused, SiteStateError, SiteStateStore, arrays_digest
from fedguard.clients.training import evaluate_model, make_training_setup, proximal_regularizer
from fedguard.conf.contract import contract_of
from fedguard.conf.plans import trains_privately
from fedguard.conf.schema import CONTRACT_DATASETS
from fedguard.conf.run_config import cached_config_from_yaml
from fedguard.privacy.secagg.envelope import ShareAuthenticationError
from fedguard.privacy.secagg.protocol import SecAggError
from fedguard.privacy.secagg.shamir import ShamirError

logger = logging.getLogger(__name__)

# Set by `fedguard simulate` for its engine's workers (simulations/simulate.py::quiet_workers):
# Flower's own warnings there (an actor's shutdown notice) are noise on the user's console.
QUIET_FLOWER_ENV = "FEDGUARD_QUIET_FLOWER"
if os.environ.get(QUIET_FLOWER_ENV):
    logging.getLogger("flwr").setLevel(logging.ERROR)


# Typed rejections: each ends one request with one line in this site's log and an error
# reply the server counts as failed, with the reason. Anything else is a bug and keeps
# Flower's traceback.
REJECTIONS = (
    MalformedMessage, DatasetError, PartitionError, SiteConfigError, SecAggError, ShamirError, ShareAuthenticationError,
    SiteStateError, ClipError, ResendRefused, PreprocessingRefused,
)
# What a fedguard config text may raise while being parsed and validated.
MAX_REASON_CHARS = 500
# A simulation's roster of its virtual sites' identity keys, beside their state dirs (simulations/simulate.py).
SIMULATION_ROSTER = "secagg-roster.json"


@dataclass(frozen=True)
class LocalData:
    train_x: np.ndarray
    train_y: np.ndarray
    validation_x: np.ndarray
    validation_y: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int
    # Own files: the training rows' id under the contract's declared scaling (clients/own_files.py).
    fingerprint: str | None = None


def load_local_data(cfg: DictConfig, site: SiteSettings) -> LocalData:
    """This site's partition of the training set, with its local validation split.

    Cached on what the data depends on (dataset, partition, seed), not the whole run config:
    rounds that change only training settings reuse the loaded arrays."""
    return _load_local_data_cached(_data_text(cfg), site)


def _data_text(cfg: DictConfig) -> str:
    """What a site's loaded data depends on, as YAML: the data cache's key."""
    return OmegaConf.to_yaml({"dataset": cfg.dataset, "partition": cfg.partition, "seed": cfg.seed}, resolve=True)


@lru_cache(maxsize=8)
def _data_text_of(config_text: str) -> str:
    """``_data_text`` once per run-config text (a request's config is parsed from that text): building
    it deep-copies and YAML-dumps two config nodes, ~5 ms a request, every site every round."""
    return _data_text(cached_config_from_yaml(config_text))


def _own_files(cfg: DictConfig, site: SiteSettings) -> LocalData:
    """A site's own files (its node config ``data``), checked against the run's data contract
    before anything trains; the validation split is a seeded shuffle of them."""
    features, labels, split = own_examples(cfg, site)
    contract = contract_of(cfg.dataset)
    train, validation = split.train, split.validation
    return LocalData(features[train], labels[train], features[validation], labels[validation],
                     contract.input_shape, contract.num_classes, split.fingerprint)


# Sites per process whose data stays loaded. A simulation actor serves many virtual sites
# in turn (about 50 each at 100 clients on 2 cores): with room for 4 every request missed and
# re-partitioned (~10 ms a site a round). One dataset's partitions are disjoint, so however
# many are kept they add at most one copy of its training split to the dataset cache.
LOCAL_DATA_CACHE_SITES = 256


@lru_cache(maxsize=LOCAL_DATA_CACHE_SITES)
def _load_local_data_cached(data_text: str, site: SiteSettings) -> LocalData:
    cfg = OmegaConf.create(data_text)
    if cfg.dataset.name in CONTRACT_DATASETS:
        return _own_files(cfg, site)
    if site.data:
        raise SiteConfigError(f"this site was started with its own files ('{DATA_KEY}'), but the run trains on "
                              f"the built-in dataset={cfg.dataset.name}; join runs with dataset=tabular or images")
    bundle = load_dataset(cfg.dataset, cfg.seed, root_override=site.data_root)
    rows = partition_of(bundle.train_y, cfg.partition, site.num_partitions, cfg.seed, site.partition_id)
    split = split_train_validation(rows, cfg.dataset.validation_fraction, cfg.seed + site.partition_id)
    if len(split.train_indices) == 0:
        raise LocalDataError(
            f"partition {site.partition_id} of {site.num_partitions} holds no training examples "
            f"({len(bundle.train_y)} rows split by partition={cfg.partition.name})"
        )
    return LocalData(
        train_x=bundle.train_x[split.train_indices],
        train_y=bundle.train_y[split.train_indices],
        validation_x=bundle.train_x[split.validation_indices],
        validation_y=bundle.train_y[split.validation_indices],
        input_shape=bundle.input_shape,
        num_classes=bundle.num_classes,
    )


def _round_seed(cfg: DictConfig, site: SiteSettings, server_round: int) -> int:
    """Batch order of non-private training (reproducible). Never used under sample-level DP."""
    digest = hashlib.sha256(f"{cfg.seed}/{site.partition_id}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def refuse_bad_requests(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: a typed rejection becomes a clean error reply, before any other mod sees it."""
    try:
        return call_next(msg, context)
    except REJECTIONS as err:
        shown = err.public if isinstance(err, LocalDataError) else str(err)  # no single records (datasets.py)
        reason = f"{type(err).__name__}: {shown}"[:MAX_REASON_CHARS]
        partition = context.node_config.get(PARTITION_ID_KEY, "?")
        logger.error("partition %s: refusing the %s request: %s: %s", partition, msg.metadata.message_type,
                     type(err).__name__, err)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


@dataclass(frozen=True)
class Request:
    """What a train or evaluate message asks for, decoded and checked before any work starts."""

    cfg: DictConfig
    config_text: str
    site: SiteSettings
    server_round: int
    proximal_mu: float
    state_dict: dict[str, torch.Tensor]


@lru_cache(maxsize=8)
def _model_layout(config_text: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype of each array of the configured model, built on the meta device (no memory)."""
    cfg = cached_config_from_yaml(config_text)
    shape, num_classes = expected_layout(cfg.dataset)
    try:
        with torch.device("meta"):
            model = build_model(cfg.model, shape, num_classes, private=trains_privately(cfg))
    except ValueError as err:
        raise MalformedMessage(f"the config names a model that cannot be built: {err}") from None
    return {key: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for key, t in model.state_dict().items()}


def decode_request(msg: Message, context: Context) -> Request:
    """Decode a train/evaluate message; raises MalformedMessage (or SiteConfigError) naming what is wrong."""
    content = msg.content
    only_records(content, {protocol.ARRAYS_KEY, protocol.CONFIG_KEY})
    config = require_record(content, protocol.CONFIG_KEY, ConfigRecord)
    config_text = text(config, protocol.FEDGUARD_CONFIG_KEY)
    cfg = parse_run_config(config_text)
    # Before anything builds the model: a custom model is imported only if this site named it.
    check_custom_model_allowed(str(cfg.model.name), cfg.model.target, dict(context.node_config))
    arrays = decode_arrays(content.get(protocol.ARRAYS_KEY), _model_layout(config_text))
    return Request(
        cfg=cfg,
        config_text=config_text,
        site=read_site_settings(dict(context.node_config)),
        server_round=count(config, protocol.SERVER_ROUND_KEY, minimum=0, default=0),
        proximal_mu=finite_number(config, protocol.PROXIMAL_MU_KEY, 0.0, math.inf, default=0.0),
        state_dict={key: torch.from_numpy(values.copy()) for key, values in arrays.items()},
    )


def _unpack(msg: Message, context: Context):
    request = decode_request(msg, context)
    cfg, site = request.cfg, request.site
    data = _load_local_data_cached(_data_text_of(request.config_text), site)
    model = model_from_state(
        cfg.model, data.input_shape, data.num_classes, request.state_dict, private=trains_privately(cfg), take=True
    )
    device = resolve_device(site.device or cfg.device)
    return cfg, site, data, model, device, request


def _privacy_record(report: dict, site: SiteSettings) -> ConfigRecord:
    return ConfigRecord({**report, protocol.PARTITION_ID_KEY: site.partition_id})


def train(msg: Message, context: Context) -> Message:
    cfg, site, data, model, device, request = _unpack(msg, context)
    # Adaptive clipping: refuse a bad clip norm from the server before training spends anything.
    round_clip_norm(cfg, msg.content[protocol.CONFIG_KEY], request.server_round)
    check_site_floor(cfg, read_site_floor(context.node_config))  # the site's own floor, before anything is spent
    store = _site_state_store(cfg, site, msg, data)
    if store is None:
        return _train_reply(msg, context.state, cfg, site, data, model, device, request)
    digest = arrays_digest(msg.content[protocol.ARRAYS_KEY])
    with store.locked(context.state) as state:
        if (cached := store.cached_reply(request.server_round, digest)) is not None:
            if resend_enters_a_new_sum(cfg):
                raise ResendRefused(
                    f"round {request.server_round} was already released into a secure-aggregation sum on this "
                    "global model; resending it into a new session would let the server difference two sums "
                    "(and add unaccounted noise under distributed DP), so this site sits the round out"
                )
            logger.warning(
                "partition %d: round %d was already trained on this global model (the server restarted); "
                "sending the same update again, which spends no privacy", site.partition_id, request.server_round,
            )
            content = _reply_content(cached, site)
            content[protocol.LEDGER_KEY] = store.ledger_record()
            return Message(content, reply_to=msg)
        reply = _train_reply(msg, state, cfg, site, data, model, device, request)
        if reply.has_error():
            return reply
        # Order matters for a crash at any point: accountant state, then ledger, then replay cache.
        store.save_privacy(state)
        content = reply.content
        if protocol.PRIVACY_KEY in content:
            store.record_spend(
                dict(content[protocol.PRIVACY_KEY]),
                partition_id=site.partition_id,
                server_round=request.server_round,
                max_grad_norm=float(cfg.privacy.max_grad_norm),
                committed=training_commitments(cfg, len(data.train_y)),
            )
        if protocol.ARRAYS_KEY in content:
            store.remember_reply(
                CachedReply(
                    request.server_round,
                    digest,
                    # Under secure aggregation only the fact of the release is kept: it is never resent.
                    {} if resend_enters_a_new_sum(cfg) else content[protocol.ARRAYS_KEY].to_torch_state_dict(),
                    dict(content[protocol.METRICS_KEY]),
                    dict(content[protocol.PRIVACY_KEY]) if protocol.PRIVACY_KEY in content else None,
                )
            )
        content[protocol.LEDGER_KEY] = store.ledger_record()
        return reply


def _site_state_store(cfg: DictConfig, site: SiteSettings, msg: Message, data) -> SiteStateStore | None:
    """Private training keeps its state on the site's disk (its ``state-dir``), tied to the
    fingerprint of its training set; non-private training spends nothing worth keeping."""
    if not trains_privately(cfg):
        return None
    if site.state_dir:
        root = Path(site.state_dir)
    elif site.ephemeral_privacy_state:
        logger.warning("no state-dir for this site: its privacy spend is kept for this run only")
        return None
    else:  # a later run would start the same data at epsilon 0
        raise MalformedMessage("sample-level DP needs this site's state-dir (its spend across runs); "
                               "set node config ephemeral-privacy-state=true to train without one")
    lineage = text(msg.content[protocol.CONFIG_KEY], protocol.LINEAGE_KEY)
    try:
        return SiteStateStore(root, lineage, data_fingerprint=data.fingerprint or data_fingerprint((data.train_x, data.train_y)),
                              site_budget=site.epsilon_budget)
    except SiteStateError as err:
        raise MalformedMessage(str(err)) from None


def _reply_content(cached: CachedReply, site: SiteSettings) -> RecordDict:
    content = RecordDict(
        {protocol.ARRAYS_KEY: ArrayRecord(cached.arrays), protocol.METRICS_KEY: MetricRecord(cached.metrics)}
    )
    if cached.privacy is not None:
        content[protocol.PRIVACY_KEY] = _privacy_record(cached.privacy, site)
    return content


def _train_reply(
    msg: Message,
    state: RecordDict,
    cfg: DictConfig,
    site: SiteSettings,
    data: LocalData,
    model: torch.nn.Module,
    device: torch.device,
    request: Request,
) -> Message:
    """Train on the site's data (privately if configured) and build the reply, or a budget refusal."""
    server_round, mu = request.server_round, request.proximal_mu
    regularizer = proximal_regularizer(model, mu) if mu > 0 else None
    # Under sample-level DP the batches come from OS randomness (never from the recorded seed,
    # partition id and round, which would let anyone holding config.yaml rebuild every batch).
    seed = None if trains_privately(cfg) else _round_seed(cfg, site, server_round)
    setup = make_training_setup(model, data.train_x, data.train_y, cfg.train, seed)
    trainer = build_trainer(cfg, site.epsilon_budget)
    try:
        result = trainer.train(setup, state=state, device=device, regularizer=regularizer)
    except BudgetExhausted as exhausted:
        refusal = RecordDict({protocol.PRIVACY_KEY: _privacy_record(exhausted.report, site)})
        return Message(refusal, reply_to=msg)
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES_KEY: len(data.train_y),
            protocol.TRAIN_LOSS_KEY: released_train_loss(cfg, result.outcome.mean_loss),
            protocol.TRAIN_STEPS_KEY: result.outcome.steps,
        }
    )
    # ArrayRecord(model.state_dict())'s arrays, with one copy of each tensor instead of three (wire/arrays.py).
    trained = numpy_array_record({key: t.detach().numpy() for key, t in model.to("cpu").state_dict().items()})
    reply = RecordDict({protocol.ARRAYS_KEY: trained, protocol.METRICS_KEY: metrics})
    if result.privacy is not None:
        reply[protocol.PRIVACY_KEY] = _privacy_record(result.privacy, site)
    return Message(reply, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    cfg, site, data, model, device, _request = _unpack(msg, context)
    if not sends_local_metrics(cfg):
        # conf.sample_dp_checks refuses such a run; a site does not answer a server that asks anyway.
        raise MalformedMessage(
            "under sample-level DP local-validation metrics are not sent (no epsilon covers them); "
            "the run must set privacy.release_unaccounted_metrics=true"
        )
    if len(data.validation_y) == 0:
        raise LocalDataError(
            f"partition {site.partition_id} has no local validation examples "
            f"(dataset.validation_fraction={cfg.dataset.validation_fraction})"
        )
    outcome = evaluate_model(model, data.validation_x, data.validation_y, cfg.evaluate.batch_size, device)
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES_KEY: outcome.num_examples,
            protocol.EVAL_LOSS_KEY: outcome.loss,
            protocol.EVAL_ACCURACY_KEY: outcome.accuracy,
        }
    )
    return Message(RecordDict({protocol.METRICS_KEY: metrics}), reply_to=msg)


def with_site_state_root(root: Path, collusion_fraction: float | None = None) -> Mod:
    """Give each virtual site of a simulation a state dir under ``root`` (a real site sets its own),
    the secure-aggregation roster the harness wrote there (``SIMULATION_ROSTER``), if any, and
    the simulation's ``site_collusion_fraction`` as each site's own setting (when not None)."""

    def site_state_root(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if collusion_fraction is not None and SECAGG_COLLUSION_FRACTION_KEY not in context.node_config:
            context.node_config[SECAGG_COLLUSION_FRACTION_KEY] = float(collusion_fraction)
        if not context.node_config.get(STATE_DIR_KEY):
            partition = context.node_config.get(PARTITION_ID_KEY, "unknown")
            context.node_config[STATE_DIR_KEY] = str(root / f"partition-{partition}")
        if not context.node_config.get(SECAGG_ROSTER_KEY) and (root / SIMULATION_ROSTER).is_file():
            context.node_config[SECAGG_ROSTER_KEY] = str(root / SIMULATION_ROSTER)
        return call_next(msg, context)

    return site_state_root


def build_client_app(
    site_state_root: Path | None = None,
    site_data: list[str] | None = None,
    custom_model: str | None = None,
    outer_mods: tuple[Mod, ...] = (),
    collusion_fraction: float | None = None,
) -> ClientApp:
    """fedguard's ClientApp; simulation passes where its virtual sites keep their state, for a
    rehearsal on own files which file or directory each virtual site reads, the run's custom
    model target its virtual sites accept, and on a Ray cluster the mod that places that state
    on the node a client runs on (outermost)."""
    front: list[Mod] = [*outer_mods, *([with_site_state_root(site_state_root, collusion_fraction)]
                                       if site_state_root is not None else [])]
    if site_data:
        front.append(with_site_data(list(site_data)))
    if custom_model:
        front.append(with_custom_model(custom_model))
    client_app = ClientApp()
    # The run's layers (SecAgg+, client-level DP) are picked from its config: clients/layers.py.
    client_app.train(mods=[*front, refuse_bad_requests, run_layers])(train)
    client_app.evaluate(mods=[*front, refuse_bad_requests])(evaluate)
    client_app.train("secagg", mods=[*front, refuse_bad_requests])(secure_aggregation_stage)
    client_app.query("preprocess", mods=[*front, refuse_bad_requests])(preprocessing_stage)
    return client_app


# What `flwr run` loads (pyproject [tool.flwr.app.components]): sites configure their state dir themselves.
app = build_client_app()
