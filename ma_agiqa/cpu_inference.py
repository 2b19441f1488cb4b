"""A faster CPU inference form of a model's frozen CNN backbone, with the same weights and scores.

Training and checkpoints keep the eager modules; this rewrites only a model that scores on CPU:
BatchNorm folded into the convolution before it (in eval mode a fixed affine map per channel) and the
channels-last layout that oneDNN's convolutions run fastest in, so that no layout reorders happen between layers.
"""
from __future__ import annotations

import torch
from torch import nn


def _bn_after_conv(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d]]:
    """(bn name, conv, bn) where the BatchNorm's input is the very tensor that the conv returned, found by
    running ``example`` through the model once: the data flow, not the modules' names or order."""
    produced: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}  # the tensor is kept so that no id is reused
    found: dict[nn.BatchNorm2d, nn.Conv2d] = {}

    def after_conv(conv, _inputs, out):
        produced[id(out)] = (conv, out)

    def before_bn(bn, inputs):
        if id(inputs[0]) in produced:
            found[bn] = produced[id(inputs[0])][0]

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(before_bn))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return [(name, found[bn], bn) for name, bn in model.named_modules() if bn in found]


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What a BatchNorm does after normalising: timm's BatchNormAct2d adds dropout and an activation."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    return nn.Sequential(*rest) if rest else nn.Identity()


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution's weight and
    bias, in place; returns how many were folded. Only for inference: the folded model trains differently."""
    if model.training:
        raise ValueError("fold_batchnorm is for a model in eval mode")
    pairs = _bn_after_conv(model, example)
    for name, conv, bn in pairs:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, _after_norm(bn))
    return len(pairs)
