"""Every model builds for every dataset it supports, with the right output shape."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from fedguard.clients.datasets import load_dataset
from fedguard.clients.models import build_model, resolve_device
from fedguard.conf import compose_config
from fedguard.conf.schema import IMAGE_DATASETS

FAKE_SHAPES = {"fashion_mnist": (1, 28, 28)}


# cnn on tabular data is refused by the config (tested in test_config), so it is not paired here.
SUPPORTED_PAIRS = [
    (model, dataset)
    for model in ("logreg", "mlp", "cnn")
    for dataset in ("digits", "breast_cancer", "synthetic", "fashion_mnist")
    if model != "cnn" or dataset in IMAGE_DATASETS
]


@pytest.mark.parametrize(("model_name", "dataset_name"), SUPPORTED_PAIRS)
def test_forward_shape(model_name, dataset_name):
    cfg = compose_config([f"dataset={dataset_name}", f"model={model_name}"])
    if dataset_name in FAKE_SHAPES:  # shape only: no need to read 70,000 images here
        input_shape, num_classes = FAKE_SHAPES[dataset_name], 10
    else:
        bundle = load_dataset(cfg.dataset, cfg.seed)
        input_shape, num_classes = bundle.input_shape, bundle.num_classes
    model = build_model(cfg.model, input_shape, num_classes)
    out = model(torch.randn(7, *input_shape))
    assert out.shape == (7, num_classes)


@pytest.mark.parametrize("model_name", ["logreg", "mlp", "cnn"])
def test_models_are_opacus_compatible(model_name):
    cfg = compose_config(["dataset=digits", f"model={model_name}"])
    model = build_model(cfg.model, (1, 8, 8), 10)
    assert ModuleValidator.validate(model, strict=False) == []


def test_device_choice_without_gpu():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="device=cuda"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"


def test_fixable_layers_are_replaced_with_a_log_line(caplog):
    from fedguard.clients.models import make_dp_compatible

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    fixed = make_dp_compatible(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fixed.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in fixed.modules())
    assert "replacing" in caplog.text


def test_unfixable_models_are_refused_before_training():
    from fedguard.clients.models import IncompatibleModelError, make_dp_compatible

    model = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()  # Opacus needs training mode; fix() cannot change it
    with pytest.raises(IncompatibleModelError, match="cannot train privately"):
        make_dp_compatible(model)


def test_model_from_state_matches_the_state():
    from fedguard.clients.models import model_from_state

    cfg = compose_config(["model=cnn"])
    source = build_model(cfg.model, (1, 8, 8), 10)
    copy = model_from_state(cfg.model, (1, 8, 8), 10, source.state_dict())
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(source(x), copy(x))


def test_model_from_state_can_take_the_state_without_copying_it():
    from fedguard.clients.models import model_from_state

    cfg = compose_config(["model=mlp", "model.hidden_sizes=[16]"])
    source = build_model(cfg.model, (1, 8, 8), 10)
    given = {key: value.detach().clone() for key, value in source.state_dict().items()}
    taken = model_from_state(cfg.model, (1, 8, 8), 10, given, take=True)
    copied = model_from_state(cfg.model, (1, 8, 8), 10, source.state_dict())
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(source(x), taken(x)) and torch.equal(source(x), copied(x))
    assert all(p.requires_grad for p in taken.parameters())
    held = taken.state_dict()
    assert all(held[key].data_ptr() == given[key].data_ptr() for key in given)  # the given tensors, not copies
    assert not any(p.data_ptr() == source.state_dict()[k].data_ptr() for k, p in copied.state_dict().items())

