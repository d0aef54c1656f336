"""Config validation: bad input fails on load, naming the key and what is allowed."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from fedguard.conf import ConfigError, compose_config
from fedguard.conf.plans import clients_per_round
from fedguard.conf.run_config import config_from_yaml, config_to_yaml


def test_default_config_composes_and_validates():
    cfg = compose_config()
    assert cfg.dataset.name == "digits"
    assert cfg.simulation.num_clients == 5
    assert clients_per_round(cfg) == 5


def test_every_group_choice_composes():
    for overrides in (
        ["dataset=fashion_mnist", "model=cnn", "strategy=fedadam", "partition=dirichlet", "simulation=small"],
        ["dataset=breast_cancer", "model=logreg", "strategy=krum", "partition=shards"],
        ["dataset=synthetic", "model=mlp", "strategy=fedtrimmedavg", "simulation=large"],
        ["strategy=fedprox"], ["strategy=fedavgm"], ["strategy=fedyogi"], ["strategy=fedadagrad"], ["strategy=fedmedian"],
        ["simulation=medium"],
    ):
        cfg = compose_config(overrides)
        assert cfg.strategy.name and cfg.dataset.name


def test_config_round_trips_through_yaml():
    cfg = compose_config(["partition=dirichlet", "partition.alpha=0.3"])
    again = config_from_yaml(config_to_yaml(cfg))
    assert again == cfg


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["partition=dirichlet", "partition.alpha=0"], ["partition.alpha", "> 0"]),
        (["partition=dirichlet", "partition.alpha=-1.5"], ["partition.alpha"]),
        (["simulation.fraction_train=1.5"], ["simulation.fraction_train", "<= 1.0"]),
        (["simulation.num_clients=0"], ["simulation.num_clients", ">= 1"]),
        (["dataset=breast_cancer", "model=cnn"], ["model=cnn", "image dataset"]),
        (["device=gpu"], ["device", "auto, cpu, cuda"]),
        (["seed=-1"], ["seed", ">= 0"]),
        (["+strategy.params.learning_rate=0.1"], ["strategy.params.learning_rate", "allowed"]),
        (["+strategy.params.fraction_train=0.5"], ["strategy.params.fraction_train"]),
        (["train.learning_rate=0"], ["train.learning_rate"]),
        (["strategy=fedavgm", "strategy.params.server_momentum=1.0"], ["strategy.params.server_momentum", "[0, 1)"]),
        (["strategy=fedavgm", "strategy.params.server_learning_rate=0"],
         ["strategy.params.server_learning_rate", "> 0"]),
        (["device=cpu", "simulation.client_resources.num_gpus=0.5"], ["num_gpus", "device=cpu"]),
        (["model.channels=[30,64]", "model=cnn"], ["model.channels", "group_norm_groups"]),
        (["secure_agg=secaggplus", "strategy=krum"], ["strategy=krum", "secure_agg=secaggplus"]),
        (["secure_agg=secaggplus", "secure_agg.threshold=5"], ["secure_agg.threshold=5", "neighbours"]),
        (["secure_agg=secaggplus", "secure_agg.modulus_bits=70"], ["secure_agg.modulus_bits", "<= 62"]),
        (["secure_agg=secaggplus", "secure_agg.clip_range=0"], ["secure_agg.clip_range"]),
        (["secure_agg=secaggplus", "secure_agg.modulus_bits=8", "simulation=large"], ["fewer than 2 quantization"]),
    ],
)
def test_impossible_values_are_rejected_with_the_key(overrides, names):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    for name in names:
        assert name in str(err.value)


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["dataset.colour=blue"])
    assert "colour" in str(err.value.__cause__ or err.value)
    # Hydra's `+` forces a new key in; the schema check still refuses it.
    with pytest.raises(ConfigError, match="dataset.colour"):
        compose_config(["+dataset.colour=blue"])


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["train.batch_size=lots"])
    cause = err.value.__cause__
    assert isinstance(cause, ValidationError | ConfigKeyError)
    assert "batch_size" in str(cause)


def test_unknown_group_choice_lists_the_options():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["dataset=imagenet"])
    message = str(err.value)
    assert "imagenet" in message and "fashion_mnist" in message


def test_carried_config_is_validated_again():
    cfg = compose_config()
    text = config_to_yaml(cfg).replace("alpha: 0.5", "alpha: 0.5\n  bogus: 1")
    with pytest.raises(Exception, match="bogus"):
        config_from_yaml(text)
    with pytest.raises(ConfigError, match="fedguard-config"):
        config_from_yaml("")


def test_gpu_share_without_a_gpu_is_refused():
    import torch

    from fedguard.simulations.preflight import check_resources

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="num_gpus"):
        check_resources(compose_config(["simulation.client_resources.num_gpus=0.5"]))
    check_resources(compose_config())  # no GPU asked for: fine


def test_zero_group_norm_groups_is_a_config_error_not_a_crash():
    """Found by tests/test_fuzz_messages.py: a peer's config with group_norm_groups=0 divided by zero."""
    with pytest.raises(ConfigError, match="model.group_norm_groups"):
        compose_config(["model.group_norm_groups=0"])


def test_fedavgm_builds_flowers_server_momentum_strategy():
    """strategy=fedavgm hands its server step and momentum to Flower's FedAvgM, which the
    DP presets use: it post-processes the mean update, so client-level DP and SecAgg+ allow it."""
    from flwr.serverapp.strategy import FedAvgM

    from fedguard.server.strategies import build_strategy

    cfg = compose_config(["strategy=fedavgm", "strategy.params.server_momentum=0.5", "privacy=client_dp"])
    strategy = build_strategy(cfg)
    assert isinstance(strategy, FedAvgM)
    assert (strategy.server_learning_rate, strategy.server_momentum) == (1.0, 0.5)


def _hydra_in_one_call(overrides: list[str]):
    from hydra import compose, initialize_config_module

    from fedguard.conf import CONFIG_MODULE, CONFIG_NAME

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=CONFIG_NAME, overrides=overrides)


@pytest.mark.parametrize("overrides", [
    ["privacy=sample_dp", "privacy.noise_multiplier=1.3", "train.learning_rate=0.2"],
    ["train.learning_rate=0.2", "privacy=sample_dp", "+preset=dp_images", "privacy.target_epsilon=1"],
    ["model=custom", "model.target=pkg.mod:make", "+model.kwargs.width=24", "dataset=digits"],
    ["secure_agg=secaggplus", "secure_agg.threshold=2", "simulation.num_clients=5", "simulation.num_clients=6"],
    ["++train.learning_rate=0.5", "strategy=fedprox", "++simulation.num_clients=7"],
    ["~privacy", "train.learning_rate=0.2"],  # a group deletion: Hydra composes it whole
])
def test_cached_group_composition_is_hydras_composition(overrides):
    """conf/__init__.py composes the group choices once and applies value overrides with Hydra's
    own step: the tree (and its struct flag) must be the one a single Hydra compose builds."""
    from omegaconf import OmegaConf

    from fedguard.conf import _hydra_composition

    cached, whole = _hydra_composition(tuple(overrides)), _hydra_in_one_call(overrides)
    assert OmegaConf.to_container(cached) == OmegaConf.to_container(whole)
    assert OmegaConf.is_struct(cached) == OmegaConf.is_struct(whole)


@pytest.mark.parametrize("overrides", [
    ["privacy=sample_dp", "privacy.noise_multiplier=loud"],
    ["train.no_such_key=1"],
    ["privacy=no_such_choice", "train.learning_rate=0.2"],
    ["train.learning_rate=0.1,0.2"],
    ["~train.momentum", "strategy=fedprox"],
    ["model=custom", "model.kwargs={width: 8}"],
])
def test_cached_group_composition_fails_as_hydra_fails(overrides):
    from fedguard.conf import _hydra_composition

    with pytest.raises(Exception) as whole:
        _hydra_in_one_call(overrides)
    with pytest.raises(type(whole.value)) as cached:
        _hydra_composition(tuple(overrides))
    assert str(cached.value) == str(whole.value)
