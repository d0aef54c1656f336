"""Typed schema of fedguard's Hydra config: the allowed values and the dataclasses.

The dataclasses make OmegaConf reject unknown keys and wrong types at composition
time; :mod:`fedguard.conf.validation` rejects impossible values before any training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

DATASETS = ("fashion_mnist", "digits", "breast_cancer", "synthetic", "tabular", "images")
# Sites' own files, described by dataset.contract (conf/contract.py); the rest are built in.
CONTRACT_DATASETS = ("tabular", "images")
IMAGE_DATASETS = ("fashion_mnist", "digits", "images")
# custom: the team's own torch.nn.Module from model.target ("package.module:factory").
# scatter_linear: fixed wavelet-scattering features (kymatio) + GroupNorm + linear, for DP on images.
# resnet18: fedguard's own ResNet-18 with GroupNorm (clients/resnet.py).
MODELS = ("logreg", "mlp", "cnn", "scatter_linear", "resnet18", "custom")
# model=resnet18's first layers: the paper's 7x7/2 + max pool (imagenet), one 3x3/1 conv (small),
# or auto (imagenet when the shorter image side is at least 128 pixels).
RESNET_STEMS = ("auto", "small", "imagenet")
PARTITIONS = ("iid", "dirichlet", "shards")
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PRIVACY_MODES = ("none", "sample_dp", "client_dp", "sample_and_client_dp")
# Modes whose clients run DP-SGD (sample level) and modes the server adds client-level DP to.
SAMPLE_DP_MODES = ("sample_dp", "sample_and_client_dp")
CLIENT_DP_MODES = ("client_dp", "sample_and_client_dp")
ACCOUNTANT_NAMES = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ghost", "bookkeeping")
SECURE_AGG_MODES = ("off", "secaggplus")
# Robust aggregators look at individual updates, which secure aggregation hides.
NEEDS_INDIVIDUAL_UPDATES = ("fedmedian", "fedtrimmedavg", "krum")
MAX_MODULUS_BITS = 62
# scikit-learn's random_state (the seeded test split) takes seeds in [0, 2**32 - 1].
MAX_SEED = 2**32 - 1
# simulation.reply_poll_interval, seconds (server/reply_wait.py says why these bounds).
REPLY_POLL_RANGE = (0.001, 3.0)


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
    # dataset=tabular / images: what every site's own files must look like (conf/contract.py).
    contract: dict[str, Any] | None = None
    # declared: the contract's constants scale the inputs (no privacy cost). federated: the sites
    # compute standardization statistics together before round 1 (clients/preprocessing.py); under
    # sample-level DP each site pays preprocessing_epsilon for them from its budget.
    preprocessing: str = "declared"
    preprocessing_epsilon: float = 0.5
    # Written by the server after federated preprocessing (never by hand): the federation's
    # means/stds (and category frequencies) every site then preprocesses with; saved with the model.
    statistics: dict[str, Any] | None = None
    # dataset=tabular / images: a labelled file (or folder) the server itself holds, read under the
    # contract, to score every round centrally (server/server_test.py); optional, None: the round's
    # quality comes from federated evaluation only. A path on the server, never a site's file.
    server_test: str | None = None


@dataclass
class ModelConfig:
    name: str = MISSING
    hidden_sizes: list[int] = field(default_factory=list)
    channels: list[int] = field(default_factory=lambda: [32, 64])
    group_norm_groups: int = 8
    # model=scatter_linear: the scattering's number of scales J and of angles L.
    scattering_scale: int = 2
    scattering_angles: int = 8
    # model=resnet18: which stem (RESNET_STEMS); its stage widths are model.channels (4 of them).
    stem: str = "auto"
    # model=custom: "package.module:factory", called with kwargs (+ input_shape, num_classes if it takes them).
    target: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


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
    # The risk the graph is sized against (privacy/secagg/risk.py): colluding and dropping fractions, run-wide bound.
    assumed_collusion: float = 0.05
    assumed_dropout: float = 0.05
    max_run_exposure: float = 0.001


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
    # Seconds between the server's checks for a round's replies (server/reply_wait.py).
    reply_poll_interval: float = 0.05
    ray_address: str | None = None
    # Rehearsal on own files: virtual site i reads site_data[i] (a file or a directory), as a real
    # site reads its `fedguard client --data PATH`. Only with a contract dataset (tabular / images).
    site_data: list[str] | None = None
    # The virtual sites' own SecAgg+ collusion assumption (a real site sets secagg-collusion-fraction
    # in its node config). null: the site default, 0.05 of its roster. Lower only to rehearse or to
    # time a graph that real sites of this size would refuse (fedguard bench secagg).
    site_collusion_fraction: float | None = None


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

    superlink: str = "127.0.0.1:9093"
    ca_cert: str = "fedguard-server/certs/ca.crt"
    # Before round 1 the server waits up to this long for all simulation.num_clients sites,
    # then starts with those connected if they are at least the minimum per round.
    wait_for_clients: float = 300.0
    stream: bool = True
    # The app publisher's signature of this source tree (`fedguard publisher sign`); sites refuse
    # a run without one from a publisher they trust. null: submit unsigned (every site refuses).
    app_signature: str | None = None


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
    overwrite: bool = False  # replace the results already in hydra.run.dir (see conf/config.yaml)


def register_schema() -> None:
    """Make the schema available to the defaults list as ``fedguard_schema``."""
    ConfigStore.instance().store(name="fedguard_schema", node=FedguardConfig)
