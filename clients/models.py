"""Models shared by clients (local training) and the server (initial weights, central evaluation).

Every layer is one Opacus supports for per-sample gradients (GroupNorm, never BatchNorm).
"""

from __future__ import annotations

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


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """Check a model with Opacus's validator; fix what it can fix (saying so), refuse the rest."""
    problems = ModuleValidator.validate(model, strict=False)
    if not problems:
        return model
    logger.warning("Opacus cannot train these layers privately as they are; replacing them: %s", problems)
    fixed = ModuleValidator.fix(model)
    remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        raise IncompatibleModelError(f"the model has layers Opacus cannot train privately: {remaining}")
    return fixed


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
) -> nn.Module:
    """A fresh model holding ``state_dict``, built without the cost of random initialisation."""
    with torch.device("meta"):
        model = build_model(model_cfg, input_shape, num_classes, private=private)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state_dict, strict=True)
    return model


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
    raise ValueError(f"unknown model {model_cfg.name!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when torch sees a GPU; asking for ``cuda`` without one is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device; use device=auto or device=cpu")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
