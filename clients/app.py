"""fedguard's ClientApp (Flower Message API): local training and evaluation on a site's data.

The run's config arrives with every message (the server is the one source of truth);
the site's own settings (partition, data path, device) come from the node config.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from clients import protocol
from clients.datasets import DatasetBundle, load_dataset
from clients.models import model_from_state, resolve_device
from clients.partition import partition_indices, split_train_validation
from clients.private_training import BudgetExhausted, build_trainer
from clients.secure_aggregation import handle_stage, secure_aggregation_mod
from clients.site import SiteSettings, read_site_settings
from clients.training import evaluate_model, make_training_setup, proximal_regularizer
from conf.schema import cached_config_from_yaml, config_to_yaml, trains_privately

logger = logging.getLogger(__name__)

app = ClientApp()


@dataclass(frozen=True)
class LocalData:
    train_x: np.ndarray
    train_y: np.ndarray
    validation_x: np.ndarray
    validation_y: np.ndarray
    bundle: DatasetBundle


def load_local_data(cfg: DictConfig, site: SiteSettings) -> LocalData:
    """This site's partition of the training set, with its local validation split."""
    return _load_local_data_cached(config_to_yaml(cfg), site)


@lru_cache(maxsize=4)
def _load_local_data_cached(config_text: str, site: SiteSettings) -> LocalData:
    cfg = cached_config_from_yaml(config_text)
    bundle = load_dataset(cfg.dataset, cfg.seed, root_override=site.data_root)
    parts = partition_indices(bundle.train_y, cfg.partition, site.num_partitions, cfg.seed)
    split = split_train_validation(parts[site.partition_id], cfg.dataset.validation_fraction, cfg.seed + site.partition_id)
    return LocalData(
        train_x=bundle.train_x[split.train_indices],
        train_y=bundle.train_y[split.train_indices],
        validation_x=bundle.train_x[split.validation_indices],
        validation_y=bundle.train_y[split.validation_indices],
        bundle=bundle,
    )


def _round_seed(cfg: DictConfig, site: SiteSettings, server_round: int) -> int:
    digest = hashlib.sha256(f"{cfg.seed}/{site.partition_id}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _unpack(msg: Message, context: Context):
    config_record = msg.content[protocol.CONFIG_KEY]
    config_text = str(config_record[protocol.FEDGUARD_CONFIG_KEY])
    cfg = cached_config_from_yaml(config_text)
    site = read_site_settings(dict(context.node_config))
    data = _load_local_data_cached(config_text, site)
    model = model_from_state(
        cfg.model,
        data.bundle.input_shape,
        data.bundle.num_classes,
        msg.content[protocol.ARRAYS_KEY].to_torch_state_dict(),
        private=trains_privately(cfg),
    )
    device = resolve_device(site.device or cfg.device)
    return cfg, site, data, model, device, config_record


def _privacy_record(report: dict, site: SiteSettings) -> ConfigRecord:
    return ConfigRecord({**report, protocol.PARTITION_ID_KEY: site.partition_id})


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    cfg, site, data, model, device, config_record = _unpack(msg, context)
    server_round = int(config_record.get(protocol.SERVER_ROUND_KEY, 0))
    mu = float(config_record.get(protocol.PROXIMAL_MU_KEY, 0.0))
    regularizer = proximal_regularizer(model, mu) if mu > 0 else None
    setup = make_training_setup(model, data.train_x, data.train_y, cfg.train, _round_seed(cfg, site, server_round))
    trainer = build_trainer(cfg, site.epsilon_budget)
    try:
        result = trainer.train(setup, state=context.state, device=device, regularizer=regularizer)
    except BudgetExhausted as exhausted:
        refusal = RecordDict({protocol.PRIVACY_KEY: _privacy_record(exhausted.report, site)})
        return Message(refusal, reply_to=msg)
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES_KEY: len(data.train_y),
            protocol.TRAIN_LOSS_KEY: result.outcome.mean_loss,
            protocol.TRAIN_STEPS_KEY: result.outcome.steps,
        }
    )
    reply = RecordDict(
        {protocol.ARRAYS_KEY: ArrayRecord(model.to("cpu").state_dict()), protocol.METRICS_KEY: metrics}
    )
    if result.privacy is not None:
        reply[protocol.PRIVACY_KEY] = _privacy_record(result.privacy, site)
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, _site, data, model, device, _config = _unpack(msg, context)
    outcome = evaluate_model(model, data.validation_x, data.validation_y, cfg.evaluate.batch_size, device)
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES_KEY: outcome.num_examples,
            protocol.EVAL_LOSS_KEY: outcome.loss,
            protocol.EVAL_ACCURACY_KEY: outcome.accuracy,
        }
    )
    return Message(RecordDict({protocol.METRICS_KEY: metrics}), reply_to=msg)


@app.train("secagg")
def secure_aggregation_stage(msg: Message, context: Context) -> Message:
    """SecAgg+ stages 1-3 (share, mask, unmask); stage 0 rides on the train reply."""
    return handle_stage(msg, context)
