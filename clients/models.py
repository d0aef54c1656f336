"""Models shared by clients (local training) and the server (initial weights, central evaluation).

Every layer is one Opacus supports for per-sample gradients (GroupNorm, never BatchNorm).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from opacus.validators import ModuleValidator
from torch import nn

logger = logging.getLogger(__name__)

CONV_KERNEL_SIZE = 3
POOL_SIZE = 2


def _mlp_layers(in_features: int, hidden_sizes: Sequence[int], num_classes: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    width = in_features
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return layers


def _conv_blocks(in_channels: int, channels: Sequence[int], groups: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    width = in_channels
    for out in channels:
        layers += [
            nn.Conv2d(width, out, kernel_size=CONV_KERNEL_SIZE, padding=CONV_KERNEL_SIZE // 2),
            nn.GroupNorm(groups, out),
            nn.ReLU(),
            nn.MaxPool2d(POOL_SIZE),
        ]
        width = out
    return layers


class IncompatibleModelError(ValueError):
    """The model has layers Opacus cannot compute per-sample gradients for, and cannot fix."""


def _problem_layers(model: nn.Module) -> list[str]:
    """``name (Type): reason`` for every sub-module Opacus's validators object to."""
    found = []
    for name, module in model.named_modules():
        check = ModuleValidator.VALIDATORS.get(type(module))
        for problem in check(module) if check is not None else ():
            found.append(f"{name or '<model>'} ({type(module).__name__}): {problem}")
    return found


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """Check a model with Opacus's validator; fix what it can fix (saying so), refuse the rest."""
    problems = ModuleValidator.validate(model, strict=False)
    if not problems:
        _refuse_private_buffers(model)
        return model
    logger.warning("Opacus cannot train these layers privately as they are; replacing them: %s",
                   "; ".join(_problem_layers(model)) or problems)
    fixed = ModuleValidator.fix(model)
    remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        named = "; ".join(_problem_layers(fixed)) or str(remaining)
        raise IncompatibleModelError(f"the model has layers Opacus cannot train privately: {named}")
    _refuse_private_buffers(fixed)
    return fixed


def _refuse_private_buffers(model: nn.Module) -> None:
    """A trainable layer that keeps buffers (running statistics of the records) would release
    them unprotected; Opacus refuses it only once training starts, so refuse it here by name."""
    layers = [name or "<model>" for name, module in model.named_modules()
              if any(p.requires_grad for p in module.parameters(recurse=False)) and list(module.buffers(recurse=False))]
    if layers:
        raise IncompatibleModelError(
            f"the model has layers Opacus cannot train privately: {', '.join(layers)} (trainable layers with "
            "buffers, which would carry statistics of the records outside DP; keep statistics out of trainable "
            "layers or use GroupNorm)")


def _custom_model(model_cfg: DictConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The team's own model: ``model.target`` = "package.module:factory", called with ``model.kwargs``
    (plus ``input_shape`` and ``num_classes`` when the factory takes them), Hydra-instantiate style."""
    target = str(model_cfg.target or "")
    module_name, _, attribute = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model.target={target!r} cannot be loaded ({err}); it must be importable on the "
                         "server and on every site") from None
    kwargs = dict(model_cfg.kwargs or {})
    parameters = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
        if key not in kwargs and (takes_any or key in parameters):
            kwargs[key] = value
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise ValueError(f"model.target={target!r} does not accept model.kwargs {sorted(kwargs)}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.target={target!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(
    model_cfg: DictConfig, input_shape: Sequence[int], num_classes: int, *, private: bool = False
) -> nn.Module:
    """Build the configured model; ``private`` makes it Opacus-compatible (same on server and clients)."""
    model = _build_model(model_cfg, input_shape, num_classes)
    return make_dp_compatible(model) if private else model


def model_from_state(
    model_cfg: DictConfig,
    input_shape: Sequence[int],
    num_classes: int,
    state_dict: dict[str, torch.Tensor],
    *,
    private: bool = False,
    take: bool = False,
) -> nn.Module:
    """A fresh model holding ``state_dict``, built without the cost of random initialisation.

    ``take=True``: the model keeps ``state_dict``'s tensors as its own parameters and buffers
    instead of copying them in (one model-sized copy fewer; a client decodes each request's
    arrays into fresh tensors of the model's dtypes, app.py::decode_request). The caller
    hands them over: training then changes them in place.

    Two kinds of custom model are built on the CPU the ordinary way and the state copied in:
    - non-persistent buffers (``register_buffer(..., persistent=False)``: in no state dict):
      ``to_empty`` would leave them uninitialised memory, which in a simulation worker can hold
      another virtual site's data, and the model would compute with it;
    - tied weights (one Parameter in two places): ``to_empty`` gives each place its own copy,
      and assigning the state's tensors would too, so training would untie them."""
    with torch.device("meta"):
        model = build_model(model_cfg, input_shape, num_classes, private=private)
    if _needs_an_ordinary_build(model):
        model = build_model(model_cfg, input_shape, num_classes, private=private)
        model.load_state_dict(state_dict, strict=True)
        return model
    model = model.to_empty(device="cpu")
    model.load_state_dict(state_dict, strict=True, assign=take)
    return model


def _needs_an_ordinary_build(model: nn.Module) -> bool:
    """Non-persistent buffers, or a parameter or buffer shared between places (see model_from_state)."""
    if any(module._non_persistent_buffers_set for module in model.modules()):
        return True
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in model.named_buffers(remove_duplicate=False)]
    return len({id(t) for t in tensors}) < len(tensors)


def _build_model(model_cfg: DictConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    in_features = int(np.prod(input_shape))
    if model_cfg.name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
    if model_cfg.name == "mlp":
        return nn.Sequential(nn.Flatten(), *_mlp_layers(in_features, model_cfg.hidden_sizes, num_classes))
    if model_cfg.name == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"model=cnn needs images (C, H, W); got input shape {tuple(input_shape)}")
        channels, height, width = input_shape
        downscale = POOL_SIZE ** len(model_cfg.channels)
        if height < downscale or width < downscale:
            raise ValueError(
                f"model.channels has {len(model_cfg.channels)} pooling blocks, too many for {height}x{width} images"
            )
        features = nn.Sequential(*_conv_blocks(channels, model_cfg.channels, model_cfg.group_norm_groups))
        flat = model_cfg.channels[-1] * (height // downscale) * (width // downscale)
        return nn.Sequential(features, nn.Flatten(), *_mlp_layers(flat, model_cfg.hidden_sizes, num_classes))
    if model_cfg.name == "resnet18":
        from fedguard.clients.resnet import ResNet18GN

        return ResNet18GN(input_shape, num_classes, tuple(model_cfg.channels), model_cfg.group_norm_groups,
                          model_cfg.stem)
    if model_cfg.name == "scatter_linear":
        return _scatter_model(model_cfg, tuple(input_shape), num_classes)
    if model_cfg.name == "custom":
        return _custom_model(model_cfg, input_shape, num_classes)
    raise ValueError(f"unknown model {model_cfg.name!r}")


def _scatter_model(model_cfg: DictConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Tramèr & Boneh's ScatterNet + linear model: fixed scattering features, GroupNorm over the
    scattering channels (per example, so no statistic of other records enters), then a linear
    layer (or an MLP with ``model.hidden_sizes``). Only the last two are trained."""
    from fedguard.clients.scattering import ScatteringFrontEnd

    front = ScatteringFrontEnd(input_shape, model_cfg.scattering_scale, model_cfg.scattering_angles)
    channels, height, width = front.output_shape
    groups = model_cfg.group_norm_groups
    if channels % groups:
        raise ValueError(f"model.group_norm_groups={groups} must divide the {channels} scattering channels "
                         f"(model.scattering_scale={front.scale}, model.scattering_angles={front.angles})")
    return nn.Sequential(front, nn.GroupNorm(groups, channels), nn.Flatten(),
                         *_mlp_layers(channels * height * width, model_cfg.hidden_sizes, num_classes))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when torch sees a GPU; asking for ``cuda`` without one is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device; use device=auto or device=cpu")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
