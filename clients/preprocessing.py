"""The site's side of federated preprocessing: its bounded sums, noised and paid for here.

The server asks once per run (a ``query.preprocess`` message carrying the run config and
lineage, before round 1). The site reads its own files as for training, takes the same
training rows, and answers with the sums vector of privacy/preprocessing.py. Under
sample-level DP, before anything leaves:

1. it refuses a second request in the same lineage (a server asking twice would average
   two noisy copies); a new run on the same data may ask again and is charged again;
2. it calibrates the noise multiplier for ``dataset.preprocessing_epsilon`` (one Gaussian
   step at sampling rate 1) and checks that its data's whole spend (every run on the same
   records, clients/data_spend.py, plus this release) fits the strictest budget, or refuses
   naming the figures;
3. it records the release as ``<lineage>:preprocessing`` in its per-data spend (so training
   in every lineage counts it) and appends a signed ``preprocessing_release`` entry to its
   ledger, both fsync'ed, then adds the noise (OS randomness) and replies.

The cohort does not matter to the guarantee: each site's release carries its own calibrated
noise, so a server that asks one site alone learns that site's noisy sums, accounted as such.
Without DP (privacy.mode=none) the exact sums are sent, as the exact model updates are.

With SecAgg+ on (secure_agg=secaggplus) the released vector does not go in the reply: the site
encodes it in fixed point (``masked_statistics_bound``), holds it as its SecAgg+ input for the
run's round 0 and answers with its advert; the server then runs the protocol's stages and
learns only the sum. The noise and the accounting above are unchanged: the masking is added
protection, and no privacy figure relies on it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from omegaconf import DictConfig

from fedguard.clients.data_spend import DataSpend, strictest
from fedguard.clients.exact_release import ExactReleaseRefused, claim_exact_release
from fedguard.clients.own_files import own_split
from fedguard.clients.local_data import ImageRecords, SiteRecords
from fedguard.clients.secure_aggregation import check_session_request, enter_session, hold_encoded_input
from fedguard.clients.site import SiteSettings, read_site_settings
from fedguard.clients.site_floor import check_site_floor, read_site_floor
from fedguard.clients.site_state import PRIVACY_DIR, SiteStateStore
from fedguard.clients.wire import protocol
from fedguard.clients.wire.checks import MalformedMessage, only_records, parse_run_config, require_record, text
from fedguard.conf.contract import Contract, ImageContract, declared_contract_of
from fedguard.conf.plans import trains_privately
from fedguard.conf.preprocessing_checks import federated_preprocessing
from fedguard.privacy.accounting import calibrate_noise_multiplier, compute_epsilon
from fedguard.privacy.client_budget import BUDGET_SLACK
from fedguard.privacy.ledger_events import PreprocessingRelease
from fedguard.privacy.preprocessing import (
    RELEASE_SAMPLE_RATE,
    RELEASE_STEPS,
    FeatureRange,
    SumsLayout,
    add_noise,
    bounded_sums,
    encode_statistics,
    noise_std,
    normalised,
    statistics_bound,
)
from fedguard.privacy.secagg.masking import levels_for

logger = logging.getLogger(__name__)

# ":" is outside the lineage id alphabet (site_state.LINEAGE_PATTERN), so no run's lineage can be named
# like a release and have its own (fresh) history stand in for the release's charge.
RELEASE_SUFFIX = ":preprocessing"
# Pixels are scaled to [0, 1] before anything else; that is an image's declared range.
PIXEL_RANGE = FeatureRange(0.0, 1.0)
# The SecAgg+ session of the statistics is the run's round 0 (training rounds count from 1), so
# a site enters at most one masked statistics sum per run (clients/secagg_record.py, through clients/secure_aggregation.py::check_session_request).
PREPROCESSING_ROUND = 0


class PreprocessingRefused(RuntimeError):
    """The site does not release its statistics (asked twice, or its budget cannot pay); the
    message is the reason the server hears."""


def contract_layout(contract: Contract) -> tuple[SumsLayout, tuple[FeatureRange, ...]]:
    """The sums vector's layout and the numeric ranges a contract declares."""
    if isinstance(contract, ImageContract):
        return SumsLayout(1), (PIXEL_RANGE,)
    ranges = tuple(FeatureRange(f.low, f.high) for f in contract.features if f.kind == "numeric")
    counted = tuple(len(f.categories) for f in contract.features if f.kind == "categorical" and f.frequencies)
    return SumsLayout(len(ranges), counted), ranges


def site_sums(records: SiteRecords, contract: Contract) -> tuple[np.ndarray, SumsLayout]:
    """The exact bounded sums of a site's training records (before any noise)."""
    layout, ranges = contract_layout(contract)
    if isinstance(records, ImageRecords):
        # An image's first and second moments over all its pixels, in [-1, 1] units.
        u = normalised(records.pixels.reshape(len(records.pixels), -1).astype(np.float64).reshape(-1, 1) / 255.0,
                       ranges).reshape(len(records.pixels), -1)
        first, second = u.mean(axis=1, keepdims=True), (u**2).mean(axis=1, keepdims=True)
        return bounded_sums(first, second, (), layout), layout
    u = normalised(records.numeric, ranges)
    coded = iter(records.codes)
    codes = []
    for feature in contract.features:
        if feature.kind == "categorical":
            block = next(coded)
            if feature.frequencies:
                codes.append(block)
    return bounded_sums(u, u**2, codes, layout), layout


def release_noise_multiplier(cfg: DictConfig) -> float:
    """The noise multiplier of the release: ``dataset.preprocessing_epsilon`` for one Gaussian step at
    sampling rate 1 (a function of the run config only, so the server derives the same figure)."""
    return calibrate_noise_multiplier(
        target_epsilon=float(cfg.dataset.preprocessing_epsilon), delta=float(cfg.privacy.delta),
        sample_rate=RELEASE_SAMPLE_RATE, steps=RELEASE_STEPS, accountant=str(cfg.privacy.accountant),
    )


def masked_statistics_bound(cfg: DictConfig, layout: SumsLayout) -> float:
    """Under SecAgg+, every site's vector is encoded over ``[-R, R]`` with the same ``R``, derived
    from the run config: ``secure_agg.max_weight`` bounds a site's rows (as it bounds a site's
    example count in training) and the release's planned noise std adds a margin
    (privacy/preprocessing.py::statistics_bound)."""
    std = noise_std(release_noise_multiplier(cfg), layout) if trains_privately(cfg) else 0.0
    return statistics_bound(float(cfg.secure_agg.max_weight), std)


def statistics_levels(cfg: DictConfig) -> int:
    """Quantisation levels per coordinate: as for model updates, so a sum over every site cannot wrap."""
    return levels_for(int(cfg.secure_agg.modulus_bits), int(cfg.simulation.num_clients))


def masks_statistics(cfg: DictConfig) -> bool:
    """Whether the statistics travel masked (SecAgg+ on): the server then sees only their sum."""
    return str(cfg.secure_agg.mode) == "secaggplus"


def _budget(cfg: DictConfig, site: SiteSettings) -> float | None:
    dp = cfg.privacy
    return strictest(dp.max_epsilon if dp.max_epsilon is not None else dp.target_epsilon, site.epsilon_budget)


def release_sums(
    cfg: DictConfig, site: SiteSettings, lineage: str, sums: np.ndarray, layout: SumsLayout, fingerprint: str
) -> tuple[np.ndarray, float]:
    """The sums as they may leave this site, with the noise std added (0 without DP); under DP
    the refusal checks, the spend and the ledger entry come first (module docstring)."""
    if not trains_privately(cfg):
        return sums, 0.0
    if not site.state_dir:
        raise MalformedMessage("federated preprocessing under sample-level DP needs this site's state-dir "
                               "(its spend across runs)")
    dp = cfg.privacy
    release = f"{lineage}{RELEASE_SUFFIX}"
    store = SiteStateStore(Path(site.state_dir), lineage, data_fingerprint=fingerprint, site_budget=site.epsilon_budget)
    data = DataSpend(Path(site.state_dir) / PRIVACY_DIR, fingerprint)
    if release in data.lineages():
        raise PreprocessingRefused(f"this site already released its preprocessing statistics for run {lineage}; "
                                   "a second release would let the server average the noise away, so it is refused")
    sigma = release_noise_multiplier(cfg)
    entry = (sigma, RELEASE_SAMPLE_RATE, RELEASE_STEPS)
    prior, recorded_budget = data.prior(release)
    budget = strictest(_budget(cfg, site), recorded_budget)
    after = compute_epsilon([*prior, entry], float(dp.delta), str(dp.accountant))
    if budget is not None and after.epsilon > budget + BUDGET_SLACK:
        spent = compute_epsilon(prior, float(dp.delta), str(dp.accountant)).epsilon
        raise PreprocessingRefused(
            f"releasing the preprocessing statistics would take this site's data from epsilon {spent:.3f} to "
            f"{after.epsilon:.3f}, over its budget {budget:.3f}; it sits preprocessing out"
        )
    std = noise_std(sigma, layout)
    data.save(release, [entry], site.epsilon_budget)  # on the record before anything leaves
    categorical = len(layout.category_counts)
    event = PreprocessingRelease(
        client=str(site.partition_id), noise_multiplier=sigma, noise_std=std, numeric=layout.numeric,
        categorical=categorical, delta=float(dp.delta), accountant=after.accountant, epsilon=after.epsilon,
        budget_epsilon=budget,
    )
    store.record_event(event, partition_id=site.partition_id)
    logger.info("partition %d: released preprocessing sums at noise multiplier %.3f (epsilon on this data now %.3f)",
                site.partition_id, sigma, after.epsilon)
    return add_noise(sums, std, secure=bool(dp.secure_noise)), std


def preprocessing_stage(msg: Message, context: Context) -> Message:
    """Answer a ``query.preprocess`` message with this site's (noisy) bounded sums."""
    content = msg.content
    only_records(content, {protocol.CONFIG_KEY})
    config = require_record(content, protocol.CONFIG_KEY, ConfigRecord)
    cfg = parse_run_config(text(config, protocol.FEDGUARD_CONFIG_KEY))
    lineage = text(config, protocol.LINEAGE_KEY)
    if not federated_preprocessing(cfg):
        raise MalformedMessage("the run does not ask for federated preprocessing (dataset.preprocessing=declared); "
                               "this site sends no statistics")
    check_site_floor(cfg, read_site_floor(context.node_config))  # as for training: before anything is read or sent
    masked = masks_statistics(cfg)
    if masked:  # a session this site would refuse must not cost it the release's epsilon
        params, session_id, session_lineage = check_session_request(context, cfg, config, PREPROCESSING_ROUND)
    site = read_site_settings(dict(context.node_config))
    split = own_split(cfg, site)
    contract = declared_contract_of(cfg.dataset)
    sums, layout = site_sums(split.train_records, contract)
    if masked and sums[0] > float(cfg.secure_agg.max_weight):
        raise PreprocessingRefused(f"this site has more training rows than secure_agg.max_weight="
                                   f"{cfg.secure_agg.max_weight}, the bound its masked statistics are encoded for")
    if masked and not trains_privately(cfg):  # exact sums: one masked release per set of files, whatever the run
        try:
            claim_exact_release(context, site.state_dir, split.fingerprint, lineage)
        except ExactReleaseRefused as err:
            raise PreprocessingRefused(str(err)) from None
    released, std = release_sums(cfg, site, lineage, sums, layout, split.fingerprint)
    record = ConfigRecord({
        protocol.PREPROCESS_NUMERIC_FIELD: layout.numeric,
        protocol.PREPROCESS_CATEGORIES_FIELD: [int(c) for c in layout.category_counts],
        protocol.PREPROCESS_NOISE_STD_FIELD: float(std),
        protocol.PARTITION_ID_KEY: site.partition_id,
    })
    reply = RecordDict({protocol.PREPROCESS_KEY: record})
    if masked:  # held here until the mask stage; only its masked form ever leaves
        encoded = encode_statistics(released, masked_statistics_bound(cfg, layout), statistics_levels(cfg))
        hold_encoded_input(context, encoded)
        reply[protocol.SECAGG_KEY] = enter_session(context, params, PREPROCESSING_ROUND, session_id, session_lineage)
    else:
        record[protocol.PREPROCESS_SUMS_FIELD] = [float(v) for v in released]
    if trains_privately(cfg):
        store = SiteStateStore(Path(str(site.state_dir)), lineage)
        reply[protocol.LEDGER_KEY] = store.ledger_record()
    return Message(reply, reply_to=msg)

