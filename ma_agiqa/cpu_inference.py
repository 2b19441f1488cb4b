"""A faster CPU inference form of a model's CNN backbone, with the same weights and scores.

Training and checkpoints keep the eager modules; this rewrites only a model that scores on CPU (in eager
PyTorch: no compilation at an actor's start, any batch size): each BatchNorm folded into the convolution before
it (in eval mode a fixed affine map per channel), the activation after it run as a post-op of the same oneDNN
call, and the channels-last layout that oneDNN's convolutions run fastest in, so that no layout reorders happen
between layers. Measured in benchmarks/offline_cpu.py.
"""
from __future__ import annotations

import torch
from timm.layers import Conv2dSame, pad_same
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


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@torch.no_grad()
def fuse_conv_bn_act(model: nn.Module, example: torch.Tensor) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution's weight and
    bias, and run the two with the activation timm's BatchNormAct2d applies after them as one ``ConvAct``; in
    place. Returns how many were fused. Only for inference: the fused model neither trains nor saves the same."""
    if model.training:
        raise ValueError("fuse_conv_bn_act is for a model in eval mode")
    names = {module: name for name, module in model.named_modules()}
    pairs = _bn_after_conv(model, example)
    for bn_name, conv, bn in pairs:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
        act = getattr(bn, "act", nn.Identity())  # BatchNormAct2d's dropout is a no-op in eval
        if ConvAct.supports(conv, act):
            _set(model, names[conv], ConvAct(conv, act))
            _set(model, bn_name, nn.Identity())
        else:
            _set(model, bn_name, act)
    return len(pairs)


class ConvAct(nn.Module):
    """A convolution and the activation after it as one oneDNN call (the activation a post-op: no second pass
    over the output), the kernel that torch.compile's CPU backend emits for the same pattern."""

    _ACTS = {nn.ReLU6: ("hardtanh", [0.0, 6.0]), nn.ReLU: ("relu", []), nn.Identity: ("none", [])}

    def __init__(self, conv: nn.Conv2d, act: nn.Module):
        super().__init__()
        self.conv = conv
        self.attr, self.scalars = self._ACTS[type(act)]
        self.same = isinstance(conv, Conv2dSame)

    @classmethod
    def supports(cls, conv: nn.Module, act: nn.Module) -> bool:
        return (torch.backends.mkldnn.is_available() and type(act) in cls._ACTS
                and type(conv) in (nn.Conv2d, Conv2dSame) and conv.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        padding = c.padding
        if self.same:  # timm's TF "same" padding, worked out from the input's size as Conv2dSame does
            x = pad_same(x, c.kernel_size, c.stride, c.dilation)
            padding = (0, 0)
        return torch.ops.mkldnn._convolution_pointwise(
            x, c.weight, c.bias, padding, c.stride, c.dilation, c.groups, self.attr, self.scalars, ""
        )


def _channels_last_input(_module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])


def optimise_cnn_backbone(backbone: nn.Module, size: int) -> int:
    """Rewrite a frozen CNN backbone (``backbones.CNNLevels``, eval mode) for CPU inference, in place: conv +
    BatchNorm + activation fused, weights and input channels-last. Returns how many BatchNorms were fused."""
    example = torch.zeros(1, 3, size, size, device=next(backbone.parameters()).device)
    fused = fuse_conv_bn_act(backbone.model, example)
    backbone.to(memory_format=torch.channels_last)
    backbone.register_forward_pre_hook(_channels_last_input)
    return fused
