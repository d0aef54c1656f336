"""Per-layer arithmetic of book-keeping clipping (Bu, Wang, Zha, Karypis 2023).

For each supported layer, from the input activations ``a`` it saw in the forward pass and
the gradient ``g`` of the summed per-sample loss with respect to its output, one function
returns (1) each sample's squared gradient norm for the layer's trainable parameters and
(2) a function that, given the per-sample clip factors ``c``, returns the clipped sum
``sum_i c_i * grad_i`` for each of those parameters. No second backward pass is needed:
the clipped sum is one contraction of the same stored tensors.

Where a layer's per-sample gradient is smaller than the pairwise (ghost-norm) Gram
products, it is materialized once and reused for both the norm and the clipped sum (the
hybrid of the paper); otherwise the norm comes from ``(a a^T) . (g g^T)`` and the sum from
``a^T diag(c) g``. Everything here is a pure function of tensors; the hooks live in
:mod:`fedguard.clients.bookkeeping`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ClippedSum = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LayerGradients:
    """One layer's contribution: per-sample squared norms (shape [B]) and its clipped-sum map."""

    squared_norms: torch.Tensor
    clipped_sum: ClippedSum


def trainable_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}


def _scale(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Multiply each sample's slice of ``x`` (batch first) by its clip factor."""
    return x * c.view(-1, *([1] * (x.dim() - 1)))


def _materialized(per_sample: dict[str, torch.Tensor], batch: int, ref: torch.Tensor) -> LayerGradients:
    """Norms and clipped sums from explicit per-sample gradients ([B, *param.shape] each)."""
    squared = ref.new_zeros(batch)
    for grad in per_sample.values():
        # one reduction pass, no squared copy (3x faster than pow(2).sum(1) on the CNN's conv2)
        squared = squared + torch.linalg.vector_norm(grad.reshape(batch, -1), dim=1).square()

    def clipped_sum(c: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: torch.einsum("b,b...->...", c, grad) for name, grad in per_sample.items()}

    return LayerGradients(squared, clipped_sum)


def _ghost_or_materialized(
    weight_shape: torch.Size, a: torch.Tensor, g: torch.Tensor, bias_grad: torch.Tensor | None, with_weight: bool
) -> LayerGradients:
    """A weight whose per-sample gradient is ``sum_t g_t a_t^T`` with a: [B, T, D], g: [B, T, O].

    Ghost norm costs about B*T*T*(D+O); materializing costs B*T*O*D (and B*O*D memory):
    take the cheaper, as BK's hybrid does.
    """
    batch, steps, width = a.shape
    outputs = g.shape[2]
    per_sample: dict[str, torch.Tensor] = {}
    if bias_grad is not None:
        per_sample["bias"] = bias_grad
    if not with_weight:
        return _materialized(per_sample, batch, g)
    if steps * steps * (width + outputs) >= steps * outputs * width:
        per_sample["weight"] = torch.bmm(g.transpose(1, 2), a).reshape(batch, *weight_shape)
        return _materialized(per_sample, batch, g)
    weight_sq = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    rest = _materialized(per_sample, batch, g)

    def clipped_sum(c: torch.Tensor) -> dict[str, torch.Tensor]:
        sums = rest.clipped_sum(c)
        sums["weight"] = torch.einsum("bto,btd->od", _scale(c, g), a).reshape(weight_shape)
        return sums

    return LayerGradients(rest.squared_norms + weight_sq, clipped_sum)


def linear(module: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> LayerGradients:
    trainable = trainable_params(module)
    batch = a.shape[0]
    a3 = a.reshape(batch, -1, module.in_features)
    g3 = g.reshape(batch, -1, module.out_features)
    bias = g3.sum(1) if "bias" in trainable else None
    if a3.shape[1] == 1 and "weight" in trainable:
        # One row per sample: the per-sample weight gradient is the rank-1 g a^T, norm |g| |a|.
        a2, g2 = a3[:, 0], g3[:, 0]
        squared = a2.pow(2).sum(1) * g2.pow(2).sum(1)
        if bias is not None:
            squared = squared + bias.pow(2).sum(1)

        def clipped_sum(c: torch.Tensor) -> dict[str, torch.Tensor]:
            gc = _scale(c, g2)
            sums = {"weight": gc.t() @ a2}
            if bias is not None:
                sums["bias"] = gc.sum(0)
            return sums

        return LayerGradients(squared, clipped_sum)
    return _ghost_or_materialized(module.weight.shape, a3, g3, bias, "weight" in trainable)


def conv2d(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> LayerGradients:
    trainable = trainable_params(module)
    batch = a.shape[0]
    steps = g.shape[2] * g.shape[3]
    width = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    if steps * (width + module.out_channels) >= module.out_channels * width:
        # Materialized per-sample weight gradients as one grouped convolution-weight gradient: the
        # batch becomes the groups (input [1, B*C_in, H, W], output gradient [1, B*C_out, H', W']),
        # so the convolution backend computes every sample's gradient without copying receptive
        # fields (im2col + bmm, or einsum over a strided view, which copies them): 2.5-3x faster
        # on the CNN's second convolution than the strided einsum it replaces.
        per_sample: dict[str, torch.Tensor] = {}
        if "weight" in trainable:
            out_channels, in_channels = module.out_channels, module.in_channels
            per_sample["weight"] = torch.nn.grad.conv2d_weight(
                a.reshape(1, batch * in_channels, *a.shape[2:]),
                (batch * out_channels, in_channels, *module.kernel_size),
                g.reshape(1, batch * out_channels, *g.shape[2:]),
                stride=module.stride, padding=module.padding, dilation=module.dilation, groups=batch,
            ).reshape(batch, *module.weight.shape)
        if "bias" in trainable:
            per_sample["bias"] = g.sum((2, 3))
        return _materialized(per_sample, batch, g)
    # Ghost norm (the cheaper route for small feature maps, e.g. ResNet-18's last stages): the
    # weight's per-sample squared norm is <a a^T, g g^T> over output positions, from the receptive
    # fields (im2col, [B, C_in*kh*kw, L]); bmm reads the transposed operands in place (no copies).
    cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    g3 = g.reshape(batch, module.out_channels, -1)
    squared = g.new_zeros(batch)
    if "weight" in trainable:
        squared = (torch.bmm(cols.transpose(1, 2), cols) * torch.bmm(g3.transpose(1, 2), g3)).sum((1, 2))
    del cols  # the clipped sum below needs only a and g: the receptive fields are not kept
    bias = g3.sum(2) if "bias" in trainable else None
    if bias is not None:
        squared = squared + bias.pow(2).sum(1)

    def clipped_sum(c: torch.Tensor) -> dict[str, torch.Tensor]:
        # One ordinary weight-gradient convolution with each sample's output gradient scaled by its
        # clip factor: sum_i c_i * grad_i(W), at the cost of the non-private weight gradient.
        sums: dict[str, torch.Tensor] = {}
        if "weight" in trainable:
            sums["weight"] = torch.nn.grad.conv2d_weight(
                a, module.weight.shape, _scale(c, g), stride=module.stride, padding=module.padding,
                dilation=module.dilation,
            )
        if bias is not None:
            sums["bias"] = c @ bias
        return sums

    return LayerGradients(squared, clipped_sum)


def _affine_norm(trainable: dict[str, nn.Parameter], normalized: torch.Tensor, g: torch.Tensor,
                 shape: tuple[int, ...], reduce_dims: tuple[int, ...]) -> LayerGradients:
    per_sample: dict[str, torch.Tensor] = {}
    if "weight" in trainable:
        per_sample["weight"] = (g * normalized).sum(reduce_dims).reshape(g.shape[0], *shape)
    if "bias" in trainable:
        per_sample["bias"] = g.sum(reduce_dims).reshape(g.shape[0], *shape)
    return _materialized(per_sample, g.shape[0], g)


def group_norm_statistics(output: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-(sample, group) mean and 1/std the forward pass computed, from the autograd node
    of ``output`` (saved there for GroupNorm's own backward); empty when ``output`` did not come
    from ``native_group_norm``. Read in the forward hook: the graph frees them after backward."""
    node = output.grad_fn
    if type(node).__name__ != "NativeGroupNormBackward0":
        return {}
    return {"mean": node._saved_result1.detach(), "rstd": node._saved_result2.detach()}


def group_norm(module: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor, mean: torch.Tensor | None = None,
               rstd: torch.Tensor | None = None) -> LayerGradients:
    """Per-sample gradients of GroupNorm's affine weight and bias.

    With the forward pass's own statistics (``mean``, ``rstd``: [B, groups]) the weight's is
    ``rstd * (sum_s g*a - mean * sum_s g)`` per channel: one dot product over the positions and
    the bias's sum, instead of normalising the activations again, multiplying and summing.
    Without them (an output not from ``native_group_norm``), the normalisation is recomputed.
    """
    batch, channels = a.shape[0], a.shape[1]
    g3 = g.reshape(batch, channels, -1)
    trainable = trainable_params(module)
    if mean is None or rstd is None:
        normalized = F.group_norm(a, module.num_groups, eps=module.eps)
        return _affine_norm(trainable, normalized.reshape(g3.shape), g3, (channels,), (2,))
    per_sample: dict[str, torch.Tensor] = {}
    bias = g3.sum(2)
    if "weight" in trainable:
        per_group = channels // module.num_groups

        def by_channel(stat: torch.Tensor) -> torch.Tensor:
            return stat.to(g3.dtype).reshape(batch, module.num_groups, 1).expand(-1, -1, per_group).reshape(
                batch, channels)

        dot = torch.linalg.vecdot(g3, a.reshape(g3.shape))
        per_sample["weight"] = (dot - by_channel(mean) * bias) * by_channel(rstd)
    if "bias" in trainable:
        per_sample["bias"] = bias
    return _materialized(per_sample, batch, g)


def layer_norm(module: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor) -> LayerGradients:
    shape = tuple(module.normalized_shape)
    normalized = F.layer_norm(a, shape, eps=module.eps)
    batch = a.shape[0]
    g3 = g.reshape(batch, -1, *shape)
    return _affine_norm(trainable_params(module), normalized.reshape(g3.shape), g3, shape, (1,))


def embedding(module: nn.Embedding, a: torch.Tensor, g: torch.Tensor) -> LayerGradients:
    batch = a.shape[0]
    index = a.reshape(batch, -1)
    g3 = g.reshape(batch, index.shape[1], module.embedding_dim)
    if module.padding_idx is not None:
        g3 = g3 * (index != module.padding_idx).unsqueeze(-1).to(g3.dtype)  # torch gives padding rows no gradient
    if "weight" not in trainable_params(module):
        return _materialized({}, batch, g3)
    # Rows hit by two positions of one sample add up: the norm pairs positions with equal ids.
    same = (index.unsqueeze(2) == index.unsqueeze(1)).to(g3.dtype)
    squared = (same * torch.bmm(g3, g3.transpose(1, 2))).sum((1, 2))

    def clipped_sum(c: torch.Tensor) -> dict[str, torch.Tensor]:
        weight = g3.new_zeros(module.weight.shape)
        weight.index_add_(0, index.reshape(-1), _scale(c, g3).reshape(-1, module.embedding_dim))
        return {"weight": weight}

    return LayerGradients(squared, clipped_sum)


LayerFn = Callable[..., LayerGradients]
LAYERS: dict[type[nn.Module], LayerFn] = {
    nn.Linear: linear,
    nn.Conv2d: conv2d,
    nn.GroupNorm: group_norm,
    nn.LayerNorm: layer_norm,
    nn.Embedding: embedding,
}
# What a layer's rule also takes from its forward pass, read by the forward hook (keyword arguments).
FORWARD_EXTRAS: dict[type[nn.Module], Callable[[torch.Tensor], dict[str, torch.Tensor]]] = {
    nn.GroupNorm: group_norm_statistics,
}


def unsupported_reason(module: nn.Module) -> str | None:
    """Why book-keeping clipping cannot handle this module's own trainable parameters (None: it can)."""
    kind = type(module)
    if kind not in LAYERS:
        return f"{kind.__name__} has no book-keeping rule"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "Conv2d with groups > 1"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "Conv2d with string padding or a padding_mode other than zeros"
    if isinstance(module, nn.Embedding) and (
        module.max_norm is not None or module.scale_grad_by_freq or module.sparse
    ):
        return "Embedding with max_norm, scale_grad_by_freq or sparse gradients"
    return None


def unsupported_layers(model: nn.Module) -> dict[str, str]:
    """Every module holding trainable parameters that book-keeping clipping cannot handle, with why;
    also any parameter shared between modules (its per-sample gradient spans several layers)."""
    problems: dict[str, str] = {}
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        own = trainable_params(module)
        if not own:
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            problems[name or type(module).__name__] = reason
        for p in own.values():
            if id(p) in owners:
                problems[name] = f"shares a parameter with {owners[id(p)]}"
            owners[id(p)] = name
    return problems
