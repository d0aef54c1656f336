"""ResNet-18 (He, Zhang, Ren, Sun 2016) with GroupNorm, written for DP-SGD.

Why fedguard has its own: the package registry's torchvision 0.28.0 is a CUDA build that does
not import beside the CPU torch 2.13.0, and torchvision's version uses BatchNorm, whose running
statistics mix records of a batch (Opacus refuses it). This follows the paper's description,
not any library's source:

- four stages of two BasicBlocks each (two 3x3 convolutions, an identity shortcut), 64, 128,
  256 and 512 channels by default; stages 2-4 halve the resolution in their first block's first
  convolution, and that block's shortcut is a 1x1 convolution with stride 2 (the paper's
  option B), so every shortcut that changes shape is a projection;
- GroupNorm (Wu and He 2018) wherever the paper has BatchNorm: it normalises each example on
  its own, so per-sample gradients stay per sample and no statistic of other records is kept;
- the stem: the paper's ImageNet stem (7x7 convolution, stride 2, then 3x3 max pooling, stride
  2) divides the resolution by 4 before the first stage. On 28x28 Fashion-MNIST or 8x8 digits
  that leaves 7x7 and 2x2 maps for stage 1 and 1x1 from stage 3 on: most of the network would
  see a single pixel. For images smaller than ``IMAGENET_STEM_MIN_SIDE`` fedguard therefore
  uses one 3x3 convolution with stride 1 and no pooling, as the paper's own CIFAR-10 networks
  (section 4.2) do; ``model.stem`` picks one explicitly;
- global average pooling and one linear layer to the classes.

Convolutions have no bias (a normalisation follows each one, as in the paper); activations are
not in place, so the book-keeping clipping hooks (clients/bookkeeping.py) see each layer's
output as the forward pass produced it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

STEMS = ("auto", "small", "imagenet")
# Images at least this large on their shorter side get the paper's ImageNet stem under stem=auto.
IMAGENET_STEM_MIN_SIDE = 128
BLOCKS_PER_STAGE = 2  # ResNet-18: 2 BasicBlocks in each of 4 stages (+ stem and head: 18 weighted layers)
STAGES = 4


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm, added to the input (projected when its shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.norm1 = nn.GroupNorm(groups, out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.GroupNorm(groups, out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        branch = self.relu(self.norm1(self.conv1(x)))
        branch = self.norm2(self.conv2(branch))
        return self.relu(branch + self.shortcut(x))


def choose_stem(stem: str, height: int, width: int) -> str:
    """``small`` or ``imagenet``: ``auto`` takes the ImageNet stem only for images large enough."""
    if stem not in STEMS:
        raise ValueError(f"model.stem={stem!r} is not one of {', '.join(STEMS)}")
    if stem != "auto":
        return stem
    return "imagenet" if min(height, width) >= IMAGENET_STEM_MIN_SIDE else "small"


class ResNet18GN(nn.Module):
    """ResNet-18 with GroupNorm for ``(channels, height, width)`` images and ``num_classes`` classes."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (64, 128, 256, 512),
                 groups: int = 32, stem: str = "auto") -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"model=resnet18 needs images (C, H, W); got input shape {tuple(input_shape)}")
        if len(widths) != STAGES:
            raise ValueError(f"model=resnet18 has {STAGES} stages; model.channels has {len(widths)} widths")
        bad = [w for w in widths if w % groups]
        if bad:
            raise ValueError(f"model.group_norm_groups={groups} must divide every stage width; it does not divide {bad}")
        channels, height, width = (int(v) for v in input_shape)
        self.stem_kind = choose_stem(stem, height, width)
        if self.stem_kind == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False),
                nn.GroupNorm(groups, widths[0]), nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        else:
            self.stem = nn.Sequential(_conv3x3(channels, widths[0]), nn.GroupNorm(groups, widths[0]), nn.ReLU())
        stages: list[nn.Module] = []
        previous = widths[0]
        for index, out in enumerate(widths):
            first_stride = 1 if index == 0 else 2
            blocks = [BasicBlock(previous if b == 0 else out, out, first_stride if b == 0 else 1, groups)
                      for b in range(BLOCKS_PER_STAGE)]
            stages.append(nn.Sequential(*blocks))
            previous = out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(previous, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # He et al. 2015 initialisation, as the paper uses
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))
