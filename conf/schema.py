"""Typed schema of fedguard's Hydra config, and the checks types alone cannot express.

The dataclasses make OmegaConf reject unknown keys and wrong types at composition
time; :func:`validate_config` rejects impossible values (alpha <= 0, fraction > 1,
more clients per round than clients, a CNN on tabular data...) before any training,
with a message that names the key and what is allowed.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

DATASETS = ("fashion_mnist", "digits", "breast_cancer", "synthetic")
IMAGE_DATASETS = ("fashion_mnist", "digits")
MODELS = ("logreg", "mlp", "cnn")
PARTITIONS = ("iid", "dirichlet", "shards")
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PRIVACY_MODES = ("none", "sample_dp", "client_dp", "sample_and_client_dp")
# Modes whose clients run DP-SGD (sample level) and modes the server adds client-level DP to.
SAMPLE_DP_MODES = ("sample_dp", "sample_and_client_dp")
CLIENT_DP_MODES = ("client_dp", "sample_and_client_dp")
ACCOUNTANT_NAMES = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ghost")
SECURE_AGG_MODES = ("off", "secaggplus")
# Robust aggregators look at individual updates, which secure aggregation hides.
NEEDS_INDIVIDUAL_UPDATES = ("fedmedian", "fedtrimmedavg", "krum")
MAX_MODULUS_BITS = 62
# scikit-learn's random_state (the seeded test split) takes seeds in [0, 2**32 - 1].
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what is allowed."""


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str | None = None
    test_fraction: float = 0.2
    validation_fraction: float = 0.1
    num_samples: int = 20000
    num_features: int = 32
    num_classes: int = 10
    class_separation: float = 2.0


@dataclass
class ModelConfig:
    name: str = MISSING
    hidden_sizes: list[int] = field(default_factory=list)
    channels: list[int] = field(default_factory=lambda: [32, 64])
    group_norm_groups: int = 8


@dataclass
class StrategyConfig:
    name: str = MISSING
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdaptiveClippingConfig:
    """Adaptive clipping of client-level DP (privacy.client_clipping=adaptive): see conf/privacy/client_dp.yaml."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    clipped_count_stddev: float | None = None


@dataclass
class PrivacyConfig:
    mode: str = "none"
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    max_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    grad_sample_mode: str = "auto"
    max_physical_batch_size: int | None = None
    poisson_sampling: bool = True
    allow_zero_noise: bool = False
    # Sample-level DP: also send the raw training loss and local-validation metrics (no epsilon covers them).
    release_unaccounted_metrics: bool = False
    # Sample-level DP noise from a CSPRNG (ChaCha20 keyed from os.urandom) instead of torch's generator.
    secure_noise: bool = False
    # Client-level DP (DP-FedAvg, privacy=client_dp): see conf/privacy/client_dp.yaml.
    client_clip_norm: float = 1.0
    client_noise_multiplier: float | None = None
    client_target_epsilon: float | None = None
    client_max_epsilon: float | None = None
    client_sampling: str = "poisson"
    noise: str = "central"
    client_clipping: str = "fixed"
    adaptive_clipping: AdaptiveClippingConfig = field(default_factory=AdaptiveClippingConfig)


@dataclass
class SecureAggConfig:
    mode: str = "off"
    neighbours: int = 4
    threshold: int = 3
    clip_range: float = 0.5
    modulus_bits: int = 48
    max_weight: int = 100000
    stage_timeout: float = 120.0
    stage_poll_interval: float = 0.01


@dataclass
class PartitionConfig:
    name: str = MISSING
    alpha: float = 0.5
    min_partition_size: int = 10
    shards_per_client: int = 2


@dataclass
class ClientResources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class SimulationConfig:
    num_clients: int = MISSING
    rounds: int = MISSING
    fraction_train: float = 1.0
    min_clients_per_round: int = 2
    client_resources: ClientResources = field(default_factory=ClientResources)
    round_timeout: float = 600.0
    ray_address: str | None = None


@dataclass
class TrainConfig:
    local_epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass
class EvaluateConfig:
    fraction_clients: float = 0.0
    batch_size: int = 256


@dataclass
class DeploymentConfig:
    """Where `fedguard run` submits (a SuperLink on another site) and how the server waits for sites."""

    superlink: str = "127.0.0.1:9092"
    ca_cert: str = "fedguard-server/certs/ca.crt"
    # Before round 1 the server waits up to this long for all simulation.num_clients sites,
    # then starts with those connected if they are at least the minimum per round.
    wait_for_clients: float = 300.0
    stream: bool = True


@dataclass
class FedguardConfig:
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    strategy: StrategyConfig = MISSING
    partition: PartitionConfig = MISSING
    simulation: SimulationConfig = MISSING
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure_agg: SecureAggConfig = field(default_factory=SecureAggConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    seed: int = 42
    device: str = "auto"
    log_level: str = "WARNING"
    progress: bool = True
    # A run directory to continue from its last completed round (same config otherwise).
    resume: str | None = None


def register_schema() -> None:
    """Make the schema available to the defaults list as ``fedguard_schema``."""
    ConfigStore.instance().store(name="fedguard_schema", node=FedguardConfig)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _range(key: str, value: float, low: float | None, high: float | None, *, low_open: bool = False) -> None:
    if value != value:  # NaN passes every comparison below (found by tests/test_fuzz_messages.py)
        raise ConfigError(f"{key}={value!r} is not a number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lower = "" if low is None else f"{'>' if low_open else '>='} {low}"
        upper = "" if high is None else f"<= {high}"
        bounds = " and ".join(b for b in (lower, upper) if b)
        raise ConfigError(f"{key}={value!r} is out of range; it must be {bounds}")


def _validate_strategy(cfg: DictConfig) -> None:
    # Imported here so that loading the schema does not import Flower.
    from fedguard.server.strategies import STRATEGY_CLASSES, RESERVED_STRATEGY_PARAMS

    _choice("strategy.name", cfg.strategy.name, tuple(STRATEGY_CLASSES))
    accepted = set(inspect.signature(STRATEGY_CLASSES[cfg.strategy.name].__init__).parameters)
    accepted -= {"self", *RESERVED_STRATEGY_PARAMS}
    for key in cfg.strategy.params:
        if key not in accepted:
            raise ConfigError(
                f"strategy.params.{key} is not a parameter of {cfg.strategy.name}; "
                f"allowed: {', '.join(sorted(accepted))}"
            )


def _check_against_schema(cfg: DictConfig) -> None:
    """Hydra's ``+key=value`` adds keys even to typed nodes; re-merging into the schema catches them."""
    try:
        OmegaConf.merge(OmegaConf.structured(FedguardConfig), OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None


def _validate_privacy(cfg: DictConfig) -> None:
    dp = cfg.privacy
    _choice("privacy.mode", dp.mode, PRIVACY_MODES)
    from fedguard.conf.client_dp_checks import validate_client_clipping, validate_client_dp  # imports this module

    validate_client_clipping(cfg)
    if dp.mode in CLIENT_DP_MODES:
        validate_client_dp(cfg)
    if dp.mode not in SAMPLE_DP_MODES:
        return
    _choice("privacy.accountant", dp.accountant, ACCOUNTANT_NAMES)
    _choice("privacy.grad_sample_mode", dp.grad_sample_mode, GRAD_SAMPLE_MODES)
    check_noise_setting(dp, "target_epsilon", "noise_multiplier", "max_epsilon")
    _range("privacy.delta", dp.delta, 0.0, 1.0, low_open=True)
    if dp.delta >= 1.0:
        raise ConfigError(f"privacy.delta={dp.delta} must be < 1")
    _range("privacy.max_grad_norm", dp.max_grad_norm, 0.0, None, low_open=True)
    if dp.max_physical_batch_size is not None:
        _range("privacy.max_physical_batch_size", dp.max_physical_batch_size, 1, None)
    from fedguard.conf.sample_dp_checks import validate_sample_dp  # imports this module

    validate_sample_dp(cfg)
    if dp.grad_sample_mode == "ghost" and cfg.strategy.name == "fedprox":
        raise ConfigError(
            "privacy.grad_sample_mode=ghost cannot add FedProx's proximal term to its loss; "
            "use grad_sample_mode=hooks or functorch with strategy=fedprox"
        )


def check_noise_setting(dp: DictConfig, target_key: str, noise_key: str, max_key: str) -> None:
    """Exactly one of a target epsilon (calibrate the noise) and a noise multiplier (fix it);
    zero noise only when asked for explicitly. Shared by sample- and client-level DP."""
    target, noise, ceiling = dp[target_key], dp[noise_key], dp[max_key]
    if (target is None) == (noise is None):
        raise ConfigError(
            f"set exactly one of privacy.{target_key} (calibrate the noise) and privacy.{noise_key} (fix the noise)"
        )
    if target is not None:
        _range(f"privacy.{target_key}", target, 0.0, None, low_open=True)
    if noise is not None:
        _range(f"privacy.{noise_key}", noise, 0.0, None)
        if noise == 0 and not dp.allow_zero_noise:
            raise ConfigError(
                f"privacy.{noise_key}=0 gives no privacy at all; set privacy.allow_zero_noise=true "
                "if that is really what you want (e.g. to measure clipping alone)"
            )
    if ceiling is not None:
        _range(f"privacy.{max_key}", ceiling, 0.0, None, low_open=True)


def _validate_secure_agg(cfg: DictConfig) -> None:
    sa = cfg.secure_agg
    _choice("secure_agg.mode", sa.mode, SECURE_AGG_MODES)
    if sa.mode == "off":
        return
    if cfg.strategy.name in NEEDS_INDIVIDUAL_UPDATES:
        raise ConfigError(
            f"strategy={cfg.strategy.name} needs each client's update, which secure_agg=secaggplus hides "
            f"from the server; use fedavg, fedprox, fedadam, fedyogi or fedadagrad, or secure_agg=off"
        )
    cohort = clients_per_round(cfg)
    _range("secure_agg.neighbours", sa.neighbours, 2, None)
    _range("secure_agg.threshold", sa.threshold, 2, None)
    degree = min(sa.neighbours, cohort - 1)
    if sa.threshold > degree:
        raise ConfigError(
            f"secure_agg.threshold={sa.threshold} exceeds the neighbours each client has "
            f"(min(secure_agg.neighbours={sa.neighbours}, clients per round {cohort} - 1) = {degree})"
        )
    _range("secure_agg.clip_range", sa.clip_range, 0.0, None, low_open=True)
    _range("secure_agg.modulus_bits", sa.modulus_bits, 8, MAX_MODULUS_BITS)
    _range("secure_agg.max_weight", sa.max_weight, 1, None)
    _range("secure_agg.stage_timeout", sa.stage_timeout, 0.0, None, low_open=True)
    _range("secure_agg.stage_poll_interval", sa.stage_poll_interval, 0.0, sa.stage_timeout, low_open=True)
    if ((1 << sa.modulus_bits) - 1) // cfg.simulation.num_clients < 2:
        raise ConfigError(
            f"secure_agg.modulus_bits={sa.modulus_bits} leaves fewer than 2 quantization levels for "
            f"{cfg.simulation.num_clients} clients; raise it"
        )


def validate_config(cfg: DictConfig) -> None:
    """Reject unknown keys and impossible combinations before anything trains. Raises ConfigError."""
    _check_against_schema(cfg)
    _choice("dataset.name", cfg.dataset.name, DATASETS)
    _choice("model.name", cfg.model.name, MODELS)
    _choice("partition.name", cfg.partition.name, PARTITIONS)
    _choice("device", cfg.device, DEVICES)
    _choice("log_level", cfg.log_level, LOG_LEVELS)
    _range("seed", cfg.seed, 0, MAX_SEED)
    _validate_strategy(cfg)
    _validate_privacy(cfg)
    _validate_secure_agg(cfg)

    _range("dataset.test_fraction", cfg.dataset.test_fraction, 0.0, 0.9, low_open=True)
    _range("dataset.validation_fraction", cfg.dataset.validation_fraction, 0.0, 0.5)
    if cfg.dataset.name == "synthetic":
        _range("dataset.num_classes", cfg.dataset.num_classes, 2, None)
        _range("dataset.num_features", cfg.dataset.num_features, 1, None)
        _range("dataset.num_samples", cfg.dataset.num_samples, cfg.dataset.num_classes * 2, None)
    if cfg.model.name == "cnn" and cfg.dataset.name not in IMAGE_DATASETS:
        raise ConfigError(
            f"model=cnn needs an image dataset ({', '.join(IMAGE_DATASETS)}); "
            f"dataset={cfg.dataset.name} is tabular: use model=mlp or model=logreg"
        )
    for i, width in enumerate(cfg.model.hidden_sizes):
        _range(f"model.hidden_sizes[{i}]", width, 1, None)
    for i, width in enumerate(cfg.model.channels):
        _range(f"model.channels[{i}]", width, 1, None)
        if width % cfg.model.group_norm_groups:
            raise ConfigError(
                f"model.channels[{i}]={width} must be divisible by "
                f"model.group_norm_groups={cfg.model.group_norm_groups}"
            )

    if cfg.partition.name == "dirichlet":
        _range("partition.alpha", cfg.partition.alpha, 0.0, None, low_open=True)
    _range("partition.min_partition_size", cfg.partition.min_partition_size, 0, None)
    _range("partition.shards_per_client", cfg.partition.shards_per_client, 1, None)

    sim = cfg.simulation
    _range("simulation.num_clients", sim.num_clients, 1, None)
    _range("simulation.rounds", sim.rounds, 1, None)
    _range("simulation.fraction_train", sim.fraction_train, 0.0, 1.0, low_open=True)
    _range("simulation.min_clients_per_round", sim.min_clients_per_round, 1, None)
    if sim.min_clients_per_round > sim.num_clients:
        raise ConfigError(
            f"simulation.min_clients_per_round={sim.min_clients_per_round} is more clients per round "
            f"than simulation.num_clients={sim.num_clients}"
        )
    _range("simulation.client_resources.num_cpus", sim.client_resources.num_cpus, 0.0, None, low_open=True)
    _range("simulation.client_resources.num_gpus", sim.client_resources.num_gpus, 0.0, None)
    _range("simulation.round_timeout", sim.round_timeout, 0.0, None, low_open=True)
    if sim.client_resources.num_gpus > 0 and cfg.device == "cpu":
        raise ConfigError("simulation.client_resources.num_gpus > 0 contradicts device=cpu")

    _range("train.local_epochs", cfg.train.local_epochs, 1, None)
    if cfg.train.max_steps is not None:
        _range("train.max_steps", cfg.train.max_steps, 1, None)
    _range("train.batch_size", cfg.train.batch_size, 1, None)
    _range("train.learning_rate", cfg.train.learning_rate, 0.0, None, low_open=True)
    _range("train.momentum", cfg.train.momentum, 0.0, 1.0)
    _range("train.weight_decay", cfg.train.weight_decay, 0.0, None)
    _range("evaluate.fraction_clients", cfg.evaluate.fraction_clients, 0.0, 1.0)
    _range("evaluate.batch_size", cfg.evaluate.batch_size, 1, None)
    _validate_deployment(cfg)


def split_host_port(address: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) as (host, port); ValueError naming the address otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} must be HOST:PORT (port 1-65535)")
    return host.strip("[]"), int(port)


def _validate_deployment(cfg: DictConfig) -> None:
    try:
        split_host_port(str(cfg.deployment.superlink))
    except ValueError:
        raise ConfigError(f"deployment.superlink={cfg.deployment.superlink!r} must be HOST:PORT (port 1-65535)") from None
    _range("deployment.wait_for_clients", cfg.deployment.wait_for_clients, 0.0, None)


# Keys a resumed run may change: where and how it reports, not what it computes.
RESUME_MAY_DIFFER = ("resume", "deployment", "progress", "log_level")


def resume_mismatches(original: DictConfig, resumed: DictConfig) -> list[str]:
    """Dotted keys whose values differ between a run and its resumption (ignoring RESUME_MAY_DIFFER)."""

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                if not prefix and key in RESUME_MAY_DIFFER:
                    continue
                out.update(flat(value, f"{prefix}{key}."))
            return out
        return {prefix.rstrip("."): node}

    a = flat(OmegaConf.to_container(original, resolve=True))
    b = flat(OmegaConf.to_container(resumed, resolve=True))
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


def min_clients_per_round(cfg: DictConfig) -> int:
    """The fewest clients a round may sample: never below what secure aggregation can unmask."""
    floor = cfg.simulation.min_clients_per_round
    if cfg.secure_agg.mode != "off":
        floor = max(floor, cfg.secure_agg.threshold)
    return int(floor)


def trains_privately(cfg: DictConfig) -> bool:
    """Whether clients run DP-SGD, so the model must be Opacus-compatible on both sides."""
    return cfg.privacy.mode in SAMPLE_DP_MODES


def client_level_dp(cfg: DictConfig) -> bool:
    """Whether updates are clipped and noised for client-level DP (DP-FedAvg)."""
    return cfg.privacy.mode in CLIENT_DP_MODES


def uses_adaptive_clipping(cfg: DictConfig) -> bool:
    """Whether client-level DP adapts its clip norm each round (Andrew et al. 2021)."""
    return client_level_dp(cfg) and cfg.privacy.client_clipping == "adaptive"


def clients_per_round(cfg: DictConfig) -> int:
    """How many clients the server samples each round while all are available."""
    return max(min_clients_per_round(cfg), int(cfg.simulation.num_clients * cfg.simulation.fraction_train))


def config_to_yaml(cfg: DictConfig) -> str:
    """Serialize a resolved config, for carrying it in Flower's run config."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_from_yaml(text: str) -> DictConfig:
    """Parse and validate a config carried in a run config or read from a run directory."""
    if not text:
        raise ConfigError(
            "the run config has no fedguard-config; start runs with `fedguard simulate` or `fedguard run`"
        )
    schema = OmegaConf.structured(FedguardConfig)
    cfg = OmegaConf.merge(schema, OmegaConf.create(text))
    validate_config(cfg)
    return cfg


@lru_cache(maxsize=8)
def cached_config_from_yaml(text: str) -> DictConfig:
    """`config_from_yaml` once per distinct text: clients get the same config with every message."""
    return config_from_yaml(text)
