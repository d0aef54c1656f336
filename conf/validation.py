"""Checks that types alone cannot express: impossible values (alpha <= 0, fraction > 1,
more clients per round than clients, a CNN on tabular data...) and combinations whose
privacy claim could not hold, rejected before any training with a message that names
the key and what is allowed.
"""

from __future__ import annotations

import functools

from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedguard.conf.checks import check_noise_setting, choice, in_range
from fedguard.conf.contract import contract_of
from fedguard.conf.preprocessing_checks import check_preprocessing
from fedguard.conf.client_dp_checks import validate_client_clipping, validate_client_dp
from fedguard.conf.mode_keys import ChosenModes, keys_from_overrides, unused_key_error
from fedguard.conf.plans import clients_per_round
from fedguard.privacy.secagg.risk import colluders_in, listed_risk, size_graph
from fedguard.conf.sample_dp_checks import validate_sample_dp
from fedguard.conf.run_address import split_host_port
from fedguard.conf.schema import (
    ACCOUNTANT_NAMES,
    CLIENT_DP_MODES,
    CONTRACT_DATASETS,
    DATASETS,
    DEVICES,
    GRAD_SAMPLE_MODES,
    IMAGE_DATASETS,
    LOG_LEVELS,
    MAX_MODULUS_BITS,
    MAX_SEED,
    MODELS,
    NEEDS_INDIVIDUAL_UPDATES,
    PARTITIONS,
    PRIVACY_MODES,
    REPLY_POLL_RANGE,
    RESNET_STEMS,
    SAMPLE_DP_MODES,
    SECURE_AGG_MODES,
    ConfigError,
    FedguardConfig,
)
from fedguard.conf.strategy_params import STRATEGY_PARAMS


def _validate_strategy(cfg: DictConfig) -> None:
    choice("strategy.name", cfg.strategy.name, tuple(STRATEGY_PARAMS))
    accepted = STRATEGY_PARAMS[cfg.strategy.name]
    for key in cfg.strategy.params:
        if key not in accepted:
            raise ConfigError(
                f"strategy.params.{key} is not a parameter of {cfg.strategy.name}; "
                f"allowed: {', '.join(sorted(accepted))}"
            )
    if cfg.strategy.name == "fedavgm":  # server SGD: a positive step, momentum in [0, 1) or it diverges
        params = cfg.strategy.params
        if not float(params.get("server_learning_rate", 1.0)) > 0:
            raise ConfigError(f"strategy.params.server_learning_rate={params.server_learning_rate} must be > 0")
        if not 0 <= float(params.get("server_momentum", 0.0)) < 1:
            raise ConfigError(f"strategy.params.server_momentum={params.server_momentum} must be in [0, 1)")


@functools.cache
def _schema() -> DictConfig:
    """The typed schema tree, built once per process (~20 ms each time); ``OmegaConf.merge``
    copies its first argument, so the cached tree is never changed."""
    return OmegaConf.structured(FedguardConfig)


def _check_against_schema(cfg: DictConfig) -> None:
    """Hydra's ``+key=value`` adds keys even to typed nodes; re-merging into the schema catches them."""
    try:
        OmegaConf.merge(_schema(), OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None


def _validate_privacy(cfg: DictConfig) -> None:
    dp = cfg.privacy
    choice("privacy.mode", dp.mode, PRIVACY_MODES)
    validate_client_clipping(cfg)
    if dp.mode in CLIENT_DP_MODES:
        validate_client_dp(cfg)
    if dp.mode not in SAMPLE_DP_MODES:
        return
    choice("privacy.accountant", dp.accountant, ACCOUNTANT_NAMES)
    choice("privacy.grad_sample_mode", dp.grad_sample_mode, GRAD_SAMPLE_MODES)
    check_noise_setting(dp, "target_epsilon", "noise_multiplier", "max_epsilon")
    in_range("privacy.delta", dp.delta, 0.0, 1.0, low_open=True)
    if dp.delta >= 1.0:
        raise ConfigError(f"privacy.delta={dp.delta} must be < 1")
    in_range("privacy.max_grad_norm", dp.max_grad_norm, 0.0, None, low_open=True)
    if dp.max_physical_batch_size is not None:
        in_range("privacy.max_physical_batch_size", dp.max_physical_batch_size, 1, None)
    validate_sample_dp(cfg)
    if dp.grad_sample_mode in ("ghost", "bookkeeping") and cfg.strategy.name == "fedprox":
        raise ConfigError(
            f"privacy.grad_sample_mode={dp.grad_sample_mode} cannot add FedProx's proximal term to its loss; "
            "use grad_sample_mode=hooks or functorch with strategy=fedprox"
        )


def _check_secure_agg_graph(neighbours: int, threshold: int, degree: int, num_clients: int) -> None:
    """The neighbour graph is a ring with k/2 links on each side: an odd k would silently become
    k + 1 (more peers than announced); and t must exceed k/2, or a server alone can collect
    both secrets of a client from its honest neighbours (Bell et al. 2020). Sites may demand
    more (their ``secagg-colluders`` setting)."""
    if neighbours % 2 == 1 and neighbours < num_clients - 1:
        raise ConfigError(
            f"secure_agg.neighbours={neighbours} must be even (each client links to k/2 peers on each side of "
            f"a ring), or >= simulation.num_clients - 1 = {num_clients - 1} for the complete graph; "
            f"allowed: {neighbours - 1} or {neighbours + 1}"
        )
    if 2 * threshold <= degree:
        raise ConfigError(
            f"secure_agg.threshold={threshold} must be more than half the neighbours each client has "
            f"(degree {degree}), or a server deviating from the protocol can rebuild a client's input; "
            f"allowed: {degree // 2 + 1}..{degree}"
        )


def _check_secure_agg_risk(sa, cohort: int, population: int, rounds: int) -> None:
    """Refuse a graph whose run-wide exposure exceeds the stated bound under the assumed collusion and dropouts."""
    in_range("secure_agg.assumed_collusion", sa.assumed_collusion, 0.0, 0.5)
    in_range("secure_agg.assumed_dropout", sa.assumed_dropout, 0.0, 0.5)
    in_range("secure_agg.max_run_exposure", sa.max_run_exposure, 0.0, 1.0, low_open=True)
    risk = listed_risk(int(sa.neighbours), int(sa.threshold), cohort, population, rounds,
                       float(sa.assumed_collusion), float(sa.assumed_dropout))
    if risk.per_run > sa.max_run_exposure:
        sized = size_graph(cohort, population, rounds, float(sa.assumed_collusion), float(sa.assumed_dropout),
                           float(sa.max_run_exposure))
        hint = (f"secure_agg.neighbours={sized[0]} secure_agg.threshold={sized[1]} meets it" if sized else
                "no neighbours/threshold meets it with rounds failing at most 5% of the time from dropouts")
        raise ConfigError(
            f"secure_agg.neighbours={sa.neighbours} and secure_agg.threshold={sa.threshold} expose some honest site "
            f"with probability {risk.per_run:.3g} over {rounds} rounds of {cohort} sites when the server lists all "
            f"{colluders_in(population, float(sa.assumed_collusion))} of its colluders, above "
            f"secure_agg.max_run_exposure={sa.max_run_exposure} (secure_agg.assumed_collusion={sa.assumed_collusion}); "
            f"{hint}"
        )


def _validate_secure_agg(cfg: DictConfig) -> None:
    sa = cfg.secure_agg
    choice("secure_agg.mode", sa.mode, SECURE_AGG_MODES)
    if sa.mode == "off":
        return
    if cfg.strategy.name in NEEDS_INDIVIDUAL_UPDATES:
        raise ConfigError(
            f"strategy={cfg.strategy.name} needs each client's update, which secure_agg=secaggplus hides "
            f"from the server; use fedavg, fedavgm, fedprox, fedadam, fedyogi or fedadagrad, or secure_agg=off"
        )
    cohort = clients_per_round(cfg)
    in_range("secure_agg.neighbours", sa.neighbours, 2, None)
    in_range("secure_agg.threshold", sa.threshold, 2, None)
    degree = min(sa.neighbours, cohort - 1)
    if sa.threshold > degree:
        raise ConfigError(
            f"secure_agg.threshold={sa.threshold} exceeds the neighbours each client has "
            f"(min(secure_agg.neighbours={sa.neighbours}, clients per round {cohort} - 1) = {degree})"
        )
    _check_secure_agg_graph(sa.neighbours, sa.threshold, degree, int(cfg.simulation.num_clients))
    in_range("secure_agg.clip_range", sa.clip_range, 0.0, None, low_open=True)
    in_range("secure_agg.modulus_bits", sa.modulus_bits, 8, MAX_MODULUS_BITS)
    in_range("secure_agg.max_weight", sa.max_weight, 1, None)
    in_range("secure_agg.stage_timeout", sa.stage_timeout, 0.0, None, low_open=True)
    in_range("secure_agg.stage_poll_interval", sa.stage_poll_interval, 0.0, sa.stage_timeout, low_open=True)
    if ((1 << sa.modulus_bits) - 1) // cfg.simulation.num_clients < 2:
        raise ConfigError(
            f"secure_agg.modulus_bits={sa.modulus_bits} leaves fewer than 2 quantization levels for "
            f"{cfg.simulation.num_clients} clients; raise it"
        )
    _check_secure_agg_risk(sa, cohort, int(cfg.simulation.num_clients), int(cfg.simulation.rounds))


def check_mode_keys(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuse keys the user set that the chosen privacy / secure-aggregation mode never reads.

    Why: the schema gives every key a default, so ``privacy.target_epsilon=3`` without
    ``privacy=sample_dp`` would otherwise compose and train with no DP at all, silently.
    """
    modes = ChosenModes(
        privacy=str(cfg.privacy.mode),
        secure_agg=str(cfg.secure_agg.mode),
        client_clipping=str(cfg.privacy.client_clipping),
    )
    if message := unused_key_error(modes, keys_from_overrides(overrides)):
        raise ConfigError(message)


def validate_config(cfg: DictConfig, overrides: Sequence[str] | None = None) -> None:
    """Reject unknown keys and impossible combinations before anything trains (ConfigError
    naming the key). ``overrides``: the command-line overrides the config was composed with;
    when given, keys the chosen modes ignore are refused first (a config read back from a run
    directory has none, and was checked when it was composed)."""
    if overrides:
        check_mode_keys(cfg, overrides)
    _check_against_schema(cfg)
    choice("dataset.name", cfg.dataset.name, DATASETS)
    choice("model.name", cfg.model.name, MODELS)
    choice("partition.name", cfg.partition.name, PARTITIONS)
    choice("device", cfg.device, DEVICES)
    choice("log_level", cfg.log_level, LOG_LEVELS)
    in_range("seed", cfg.seed, 0, MAX_SEED)
    _validate_data_and_model(cfg)
    _validate_simulation(cfg)
    _validate_training(cfg)
    _validate_deployment(cfg)
    # Last: their rules build privacy plans from the (now sound) sampling and training keys.
    _validate_strategy(cfg)
    _validate_privacy(cfg)
    _validate_secure_agg(cfg)


def _validate_data_and_model(cfg: DictConfig) -> None:
    in_range("dataset.test_fraction", cfg.dataset.test_fraction, 0.0, 0.9, low_open=True)
    in_range("dataset.validation_fraction", cfg.dataset.validation_fraction, 0.0, 0.5)
    if cfg.dataset.name == "synthetic":
        in_range("dataset.num_classes", cfg.dataset.num_classes, 2, None)
        in_range("dataset.num_features", cfg.dataset.num_features, 1, None)
        in_range("dataset.num_samples", cfg.dataset.num_samples, cfg.dataset.num_classes * 2, None)
    _validate_contract_and_custom_model(cfg)
    if cfg.model.name in ("cnn", "scatter_linear", "resnet18") and cfg.dataset.name not in IMAGE_DATASETS:
        raise ConfigError(
            f"model={cfg.model.name} needs an image dataset ({', '.join(IMAGE_DATASETS)}); "
            f"dataset={cfg.dataset.name} is tabular: use model=mlp or model=logreg"
        )
    for i, width in enumerate(cfg.model.hidden_sizes):
        in_range(f"model.hidden_sizes[{i}]", width, 1, None)
    in_range("model.group_norm_groups", cfg.model.group_norm_groups, 1, None)  # before dividing by it (fuzzing found 0)
    if cfg.model.name == "scatter_linear":
        in_range("model.scattering_scale", cfg.model.scattering_scale, 1, 4)
        in_range("model.scattering_angles", cfg.model.scattering_angles, 1, 16)
        scale, angles = cfg.model.scattering_scale, cfg.model.scattering_angles
        per_channel = 1 + scale * angles + angles * angles * scale * (scale - 1) // 2
        if per_channel % cfg.model.group_norm_groups:  # images with C channels have C * per_channel
            raise ConfigError(
                f"model.group_norm_groups={cfg.model.group_norm_groups} must divide the {per_channel} scattering "
                f"channels per image channel (model.scattering_scale={scale}, model.scattering_angles={angles})"
            )
        return
    if cfg.model.name == "resnet18":
        choice("model.stem", cfg.model.stem, RESNET_STEMS)
        if len(cfg.model.channels) != 4:
            raise ConfigError(f"model.channels must list the 4 stage widths of model=resnet18 (e.g. [64, 128, 256, 512]); "
                              f"got {len(cfg.model.channels)}")
    for i, width in enumerate(cfg.model.channels):
        in_range(f"model.channels[{i}]", width, 1, None)
        if width % cfg.model.group_norm_groups:
            raise ConfigError(
                f"model.channels[{i}]={width} must be divisible by "
                f"model.group_norm_groups={cfg.model.group_norm_groups}"
            )


def _validate_contract_and_custom_model(cfg: DictConfig) -> None:
    """A contract dataset's contract is sound; site_data and model.target are where they belong."""
    if cfg.dataset.name in CONTRACT_DATASETS:
        contract_of(cfg.dataset)
        check_preprocessing(cfg)
    elif cfg.dataset.contract is not None:
        raise ConfigError(f"dataset.contract is read only by dataset=tabular or dataset=images, not {cfg.dataset.name}")
    elif cfg.dataset.get("server_test") is not None:
        raise ConfigError(f"dataset.server_test is read only by dataset=tabular or dataset=images (the built-in "
                          f"dataset={cfg.dataset.name} brings its own test split)")
    fraction = cfg.simulation.get("site_collusion_fraction")
    if fraction is not None and not 0 <= float(fraction) < 1:
        raise ConfigError(f"simulation.site_collusion_fraction={fraction} must be in [0, 1) (or null: the sites' "
                          "default 0.05)")
    site_data = cfg.simulation.site_data
    if site_data is not None:
        if cfg.dataset.name not in CONTRACT_DATASETS:
            raise ConfigError(f"simulation.site_data maps sites to their own files: it needs dataset=tabular or "
                              f"dataset=images (with dataset.contract), not dataset={cfg.dataset.name}")
        if len(site_data) != cfg.simulation.num_clients:
            raise ConfigError(f"simulation.site_data lists {len(site_data)} paths for "
                              f"simulation.num_clients={cfg.simulation.num_clients}: one per virtual site")
    target = cfg.model.target
    if cfg.model.name == "custom":
        module, _, attribute = str(target or "").partition(":")
        if not module or not attribute or not all(part.isidentifier() for part in [*module.split("."), attribute]):
            raise ConfigError(f"model.target={target!r} must be 'package.module:factory' (a callable returning "
                              "a torch.nn.Module)")
    elif target is not None or cfg.model.kwargs:
        raise ConfigError(f"model.target and model.kwargs are read only by model=custom, not model={cfg.model.name}")


def _validate_simulation(cfg: DictConfig) -> None:
    if cfg.partition.name == "dirichlet":
        in_range("partition.alpha", cfg.partition.alpha, 0.0, None, low_open=True)
    in_range("partition.min_partition_size", cfg.partition.min_partition_size, 0, None)
    in_range("partition.shards_per_client", cfg.partition.shards_per_client, 1, None)

    sim = cfg.simulation
    in_range("simulation.num_clients", sim.num_clients, 1, None)
    in_range("simulation.rounds", sim.rounds, 1, None)
    in_range("simulation.fraction_train", sim.fraction_train, 0.0, 1.0, low_open=True)
    in_range("simulation.min_clients_per_round", sim.min_clients_per_round, 1, None)
    if sim.min_clients_per_round > sim.num_clients:
        raise ConfigError(
            f"simulation.min_clients_per_round={sim.min_clients_per_round} is more clients per round "
            f"than simulation.num_clients={sim.num_clients}"
        )
    in_range("simulation.client_resources.num_cpus", sim.client_resources.num_cpus, 0.0, None, low_open=True)
    in_range("simulation.client_resources.num_gpus", sim.client_resources.num_gpus, 0.0, None)
    in_range("simulation.round_timeout", sim.round_timeout, 0.0, None, low_open=True)
    # Above Flower's own fixed 3 s there is nothing to gain; below 1 ms the server only loads its SuperLink.
    in_range("simulation.reply_poll_interval", sim.reply_poll_interval, REPLY_POLL_RANGE[0], REPLY_POLL_RANGE[1])
    if sim.client_resources.num_gpus > 0 and cfg.device == "cpu":
        raise ConfigError("simulation.client_resources.num_gpus > 0 contradicts device=cpu")


def _validate_training(cfg: DictConfig) -> None:
    in_range("train.local_epochs", cfg.train.local_epochs, 1, None)
    if cfg.train.max_steps is not None:
        in_range("train.max_steps", cfg.train.max_steps, 1, None)
    in_range("train.batch_size", cfg.train.batch_size, 1, None)
    in_range("train.learning_rate", cfg.train.learning_rate, 0.0, None, low_open=True)
    in_range("train.momentum", cfg.train.momentum, 0.0, 1.0)
    in_range("train.weight_decay", cfg.train.weight_decay, 0.0, None)
    in_range("evaluate.fraction_clients", cfg.evaluate.fraction_clients, 0.0, 1.0)
    in_range("evaluate.batch_size", cfg.evaluate.batch_size, 1, None)


def _validate_deployment(cfg: DictConfig) -> None:
    try:
        split_host_port(str(cfg.deployment.superlink))
    except ValueError:
        raise ConfigError(f"deployment.superlink={cfg.deployment.superlink!r} must be HOST:PORT (port 1-65535)") from None
    in_range("deployment.wait_for_clients", cfg.deployment.wait_for_clients, 0.0, None)
