"""model=resnet18: fedguard's own ResNet-18 with GroupNorm (clients/resnet.py).

Cheap checks on tiny inputs: the architecture's shape (18 weighted layers, the paper's parameter
count at ImageNet size), Opacus's validator, and book-keeping clipping's clipped gradient sum
against Opacus's hooks on it (a residual network sends two gradients into each block input,
which the CNN and MLP never exercise).
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedguard.clients.models import build_model, count_parameters
from fedguard.clients.resnet import ResNet18GN, choose_stem
from fedguard.conf import ConfigError, compose_config

from test_bookkeeping import _assert_matches_hooks, _bookkeeping, _hooks_reference

# torchvision's resnet18(num_classes=1000) has 11,689,512 parameters; GroupNorm has as many
# (a scale and a shift per channel) as BatchNorm, so the same architecture must have the same count.
IMAGENET_RESNET18_PARAMETERS = 11_689_512


def _config(*overrides: str):
    return compose_config(["dataset=fashion_mnist", "model=resnet18", *overrides])


def test_resnet18_has_the_papers_layers_and_parameter_count():
    cfg = _config()
    model = build_model(cfg.model, (3, 224, 224), 1000, private=True)
    assert count_parameters(model) == IMAGENET_RESNET18_PARAMETERS
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert len(convs) + 1 == 18  # 17 weighted convolutions + the linear head
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.stem_kind == "imagenet"
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_small_images_get_the_3x3_stem_and_every_contract_shape_works():
    assert choose_stem("auto", 28, 28) == "small" and choose_stem("auto", 128, 160) == "imagenet"
    cfg = _config("model.channels=[8,8,16,16]", "model.group_norm_groups=4")
    for shape, classes in (((1, 28, 28), 10), ((1, 8, 8), 10), ((3, 5, 7), 3)):
        model = build_model(cfg.model, shape, classes, private=True)
        assert model.stem_kind == "small"
        assert ModuleValidator.validate(model, strict=False) == []
        assert model(torch.randn(2, *shape)).shape == (2, classes)


def test_config_refuses_a_wrong_resnet_setting_by_its_key():
    with pytest.raises(ConfigError, match="model.stem"):
        _config("model.stem=huge")
    with pytest.raises(ConfigError, match="model.channels"):
        _config("model.channels=[64,128]")
    with pytest.raises(ConfigError, match="model.group_norm_groups"):
        _config("model.channels=[64,128,256,500]")
    with pytest.raises(ConfigError, match="model=resnet18 needs an image dataset"):
        compose_config(["dataset=breast_cancer", "model=resnet18"])


@pytest.mark.parametrize("stem", ["small", pytest.param("imagenet", marks=pytest.mark.simulation)])
def test_bookkeeping_clipped_sum_matches_opacus_hooks_on_resnet18(stem):
    torch.manual_seed(0)
    model = ResNet18GN((2, 12, 12), 5, widths=(4, 8, 8, 8), groups=2, stem=stem)
    x, y = torch.randn(6, 2, 12, 12), torch.randint(0, 5, (6,))
    _assert_matches_hooks(model, x, y, nn.CrossEntropyLoss())


@pytest.mark.simulation  # a second hooks-vs-bookkeeping comparison: over a second on a loaded machine
def test_the_comparison_sees_a_wrong_clipped_sum():
    """The check above can fail: dropping one block's shortcut gradient changes the sums."""
    torch.manual_seed(1)
    model = ResNet18GN((2, 12, 12), 5, widths=(4, 8, 8, 8), groups=2, stem="small")
    x, y = torch.randn(6, 2, 12, 12), torch.randint(0, 5, (6,))
    reference, max_grad_norm = _hooks_reference(copy.deepcopy(model), x, y, nn.CrossEntropyLoss())
    broken = copy.deepcopy(model)
    block = broken.stages[1][0]
    block.forward = lambda t, b=block: b.relu(b.norm2(b.conv2(b.relu(b.norm1(b.conv1(t))))) + b.shortcut(t).detach())
    ours = _bookkeeping(broken, x, y, nn.CrossEntropyLoss(), max_grad_norm)
    assert any((a - b).norm() > 1e-3 * b.norm() for a, b in zip(ours, reference))
