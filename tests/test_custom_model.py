"""model=custom: the team's own torch.nn.Module from a module outside fedguard, and Opacus's
validator on it under DP (fixable layers fixed with a warning, the rest refused by name)."""

from __future__ import annotations

import copy
import logging
import textwrap

import pytest
import torch
from torch import nn

from fedguard.clients.models import IncompatibleModelError, build_model
from fedguard.conf import compose_config, validate_config
from fedguard.conf.schema import ConfigError

TEAM_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def tabular_net(input_shape, num_classes, width=16):
        return nn.Sequential(nn.Linear(input_shape[0], width), nn.Tanh(), nn.Linear(width, num_classes))

    def with_batch_norm(input_shape, num_classes):
        return nn.Sequential(nn.Linear(input_shape[0], 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, num_classes))

    class Remembers(nn.Module):
        # a trainable layer that keeps a running mean of its inputs: statistics of the records
        def __init__(self, width):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(width))
            self.register_buffer("seen_mean", torch.zeros(width))

        def forward(self, x):
            self.seen_mean = 0.9 * self.seen_mean + 0.1 * x.mean(0).detach()
            return x * self.weight

    def with_memory(input_shape, num_classes):
        return nn.Sequential(Remembers(input_shape[0]), nn.Linear(input_shape[0], num_classes))

    class Scaled(nn.Module):
        # a constant the model computes with but never ships: a non-persistent buffer
        def __init__(self, width):
            super().__init__()
            self.linear = nn.Linear(width, width)
            self.register_buffer("scale", torch.full((width,), 7.0), persistent=False)

        def forward(self, x):
            return self.linear(x) * self.scale

    def with_constant(input_shape, num_classes):
        return nn.Sequential(Scaled(input_shape[0]), nn.Linear(input_shape[0], num_classes))

    def tied(input_shape, num_classes):
        # the last layer reuses the first one's weight (transposed use, same Parameter)
        first = nn.Linear(input_shape[0], input_shape[0])
        last = nn.Linear(input_shape[0], input_shape[0])
        last.weight = first.weight
        return nn.Sequential(first, nn.Tanh(), last, nn.Linear(input_shape[0], num_classes))

    def fixed_width(**kwargs):
        return nn.Linear(kwargs["input_shape"][0], kwargs["num_classes"])

    def not_a_model(input_shape, num_classes):
        return "a string"
    """
)


@pytest.fixture
def team_models(tmp_path, monkeypatch):
    (tmp_path / "team_models.py").write_text(TEAM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "team_models"


@pytest.fixture(scope="module")
def base():
    """Composed once (Hydra's composition costs about a second); each test edits a copy."""
    return compose_config(["dataset=tabular", "model=custom", "model.target=team_models:tabular_net"])


@pytest.fixture
def make_cfg(base):
    def make(target, **kwargs):
        cfg = copy.deepcopy(base)
        cfg.model.target = target
        cfg.model.kwargs = kwargs
        validate_config(cfg)
        return cfg

    return make


def test_factory_gets_shape_classes_and_kwargs(team_models, make_cfg):
    _cfg = make_cfg
    cfg = _cfg(f"{team_models}:tabular_net", width=5)
    model = build_model(cfg.model, (15,), 3)
    assert model[0].weight.shape == (5, 15) and model(torch.zeros(4, 15)).shape == (4, 3)
    assert build_model(_cfg(f"{team_models}:fixed_width").model, (15,), 3).weight.shape == (3, 15)


@pytest.mark.parametrize(
    ("target", "message"),
    [("team_models:absent", "cannot be loaded"), ("no_such_module_here:build", "cannot be loaded"),
     ("team_models:not_a_model", "returned str, not a torch.nn.Module")],
)
def test_bad_factories_are_refused_naming_the_target(team_models, make_cfg, target, message):
    with pytest.raises(ValueError, match=message) as err:
        build_model(make_cfg(target).model, (15,), 3)
    assert target in str(err.value)


def test_unknown_kwargs_are_refused(team_models, make_cfg):
    with pytest.raises(ValueError, match="does not accept model.kwargs"):
        build_model(make_cfg(f"{team_models}:tabular_net", depth=3).model, (15,), 3)


@pytest.mark.parametrize("target", ["no_colon", "pkg.mod:", "9pkg:build", "", None])
def test_target_must_be_module_colon_factory(make_cfg, target):
    with pytest.raises(ConfigError, match="must be 'package.module:factory'"):
        make_cfg(target)


def test_target_is_refused_for_built_in_models(base):
    cfg = copy.deepcopy(base)
    cfg.model.name = "mlp"
    with pytest.raises(ConfigError, match="read only by model=custom"):
        validate_config(cfg)


def test_under_dp_batch_norm_is_replaced_with_a_warning_naming_the_layer(team_models, make_cfg, caplog):
    cfg = make_cfg(f"{team_models}:with_batch_norm")
    with caplog.at_level(logging.WARNING, logger="fedguard.clients.models"):
        model = build_model(cfg.model, (15,), 3, private=True)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert "1 (BatchNorm1d)" in caplog.text
    # without DP the team's model is left exactly as written
    assert any(isinstance(m, nn.BatchNorm1d) for m in build_model(cfg.model, (15,), 3).modules())


def test_under_dp_a_trainable_layer_with_buffers_is_refused_by_name(team_models, make_cfg):
    cfg = make_cfg(f"{team_models}:with_memory")
    with pytest.raises(IncompatibleModelError, match=r"cannot train privately: 0 \(trainable layers with buffers"):
        build_model(cfg.model, (15,), 3, private=True)
    assert build_model(cfg.model, (15,), 3)(torch.zeros(2, 15)).shape == (2, 3)


SIDE_EFFECTS = textwrap.dedent(
    """
    import pathlib
    from torch import nn

    MARKS = pathlib.Path(__file__).parent
    (MARKS / "imported").write_text("the site imported this module")

    def build(input_shape, num_classes):
        (MARKS / "called").write_text("the site called the factory")
        return nn.Linear(input_shape[0], num_classes)
    """
)


@pytest.mark.simulation  # trains one local round through the real ClientApp
@pytest.mark.usefixtures("flower_task_identity")
def test_a_site_imports_only_the_custom_models_it_listed(tmp_path, monkeypatch, base):
    """Attack: the run's config comes from the server; a site that honoured any model.target would
    import and call whatever the server names (e.g. subprocess:getoutput with kwargs cmd=...)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from fedguard.clients.app import app as client_app
    from fedguard.clients.wire import protocol
    from fedguard.conf.run_config import config_to_yaml

    (tmp_path / "served_model.py").write_text(SIDE_EFFECTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = "age,smoker,outcome\n" + "".join(f"{20 + i},{'yes' if i % 2 else 'no'},{'ill' if i % 3 else 'healthy'}\n"
                                            for i in range(20))
    (tmp_path / "site.csv").write_text(rows)
    cfg = copy.deepcopy(base)
    cfg.dataset.contract = {"features": [{"name": "age", "center": 30, "scale": 10},
                                         {"name": "smoker", "type": "categorical", "categories": ["no", "yes"]}],
                            "label": "outcome", "classes": ["healthy", "ill"]}
    cfg.model.target = "served_model:build"
    validate_config(cfg)
    config = {protocol.FEDGUARD_CONFIG_KEY: config_to_yaml(cfg), protocol.SERVER_ROUND_KEY: 1,
              protocol.LINEAGE_KEY: "t"}

    def train(node_config):
        arrays = ArrayRecord(nn.Linear(3, 2).state_dict())  # the layout nn.Linear(3, 2) the factory builds
        message = Message(RecordDict({protocol.ARRAYS_KEY: arrays, protocol.CONFIG_KEY: ConfigRecord(config)}),
                          dst_node_id=3, message_type="train")
        message.metadata.__dict__["_src_node_id"] = 1
        context = Context(run_id=1, node_id=3, state=RecordDict(), run_config={},
                          node_config={"partition-id": 0, "data": str(tmp_path / "site.csv"), **node_config})
        return client_app(message, context)

    for listed in ({}, {"custom-models": "other_models:build tabular:net"}):
        reply = train(listed)
        assert reply.has_error() and "does not list" in reply.error.reason
        assert not (tmp_path / "imported").exists() and not (tmp_path / "called").exists()
    reply = train({"custom-models": "other_models:build,served_model:build"})
    assert not reply.has_error(), reply.error.reason
    assert (tmp_path / "called").exists()


@pytest.mark.parametrize("take", [False, True])
def test_a_model_rebuilt_from_its_state_keeps_its_non_persistent_buffers(team_models, make_cfg, take):
    """A client rebuilds the model from the server's arrays (model_from_state); a buffer the
    state dict does not carry must hold the factory's value, not whatever memory was free
    (to_empty leaves it uninitialised; in a simulation worker that can be another site's data)."""
    from fedguard.clients.models import model_from_state

    cfg = make_cfg(f"{team_models}:with_constant")
    source = build_model(cfg.model, (15,), 3)
    assert "0.scale" not in source.state_dict()
    state = {key: value.detach().clone() for key, value in source.state_dict().items()}
    rebuilt = model_from_state(cfg.model, (15,), 3, state, take=take)
    assert torch.equal(rebuilt[0].scale, torch.full((15,), 7.0))
    x = torch.randn(4, 15)
    assert torch.equal(rebuilt(x), source(x))


@pytest.mark.parametrize("take", [False, True])
def test_a_model_rebuilt_from_its_state_keeps_its_tied_weights(team_models, make_cfg, take):
    """Two layers sharing one Parameter must still share it after model_from_state, or
    training would move them apart (to_empty and assign both give each place its own tensor)."""
    from fedguard.clients.models import model_from_state

    cfg = make_cfg(f"{team_models}:tied")
    source = build_model(cfg.model, (15,), 3)
    state = {key: value.detach().clone() for key, value in source.state_dict().items()}
    rebuilt = model_from_state(cfg.model, (15,), 3, state, take=take)
    assert rebuilt[0].weight is rebuilt[2].weight
    x = torch.randn(4, 15)
    assert torch.equal(rebuilt(x), source(x))

