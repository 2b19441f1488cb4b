"""The quality branch: MANIQA (Yang et al., CVPRW 2022) as MA-AGIQA uses it.

backbone features [B, C, g, g] -> transposed-attention blocks -> 1x1 conv -> Swin stage -> transposed attention
-> 1x1 conv -> Swin stage -> per-patch score f and weight w -> the quality vector f * w, g*g wide (784 for
ViT-B/8 at 224 px). MANIQA's own score is sum(f * w) / sum(w); MA-AGIQA feeds the vector to its MoE.

The reference's details (IIGROUP/MANIQA's maniqa.py and swin.py, used unchanged by MA-AGIQA and ported by
pyiqa) are config values (``QualityConfig``): the transposed-attention output layout, a 3x3 conv + ReLU
closing each Swin layer, stage 2's MLP width, and where dropout and drop-path go. ``reference_key`` maps
the reference's parameter names onto this module's.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from .backbones import create_backbone
from .config import QualityConfig


class TransposedAttention(nn.Module):
    """Attention across channels: tokens are the C channels, each a vector of the N = g*g patch values.

    ``layout="reference"`` reshapes the [B, C, N] attention output a as MANIQA's TABlock does: transposed to
    [B, N, C], then read back as [B, C, N] without transposing back, so out[c, j] = a[(c*N + j) % C,
    (c*N + j) // C]: output channel c gathers N consecutive entries of the patch-major map (for C >= N, N
    consecutive channels at one or two patches) instead of its own channel. A fixed permutation, the function
    that MANIQA and MA-AGIQA were trained with; ``"clean"`` keeps [B, C, N]."""

    def __init__(self, num_patches: int, drop: float = 0.1, layout: str = "clean"):
        super().__init__()
        self.q = nn.Linear(num_patches, num_patches)
        self.k = nn.Linear(num_patches, num_patches)
        self.v = nn.Linear(num_patches, num_patches)
        self.drop = nn.Dropout(drop)
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, N]
        attn = F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))  # [B, C, N], scale N ** -0.5
        if self.layout == "reference":
            attn = attn.transpose(1, 2).reshape(x.shape)
        return x + self.drop(attn)


def drop_path_rates(depths, rate: float) -> list[float]:
    """Stochastic depth of each block of a stage, rising linearly from 0 to ``rate`` over all its blocks (the
    reference's ``torch.linspace(0, drop_path_rate, sum(depths))``)."""
    return torch.linspace(0, rate, sum(depths)).tolist()


class SwinStage(nn.Module):
    """MANIQA's Swin stage: layers of alternating (shifted) window blocks, each layer added back with
    ``scale``: x = scale * layer(x) + x. With ``conv`` each layer ends as the reference's BasicLayer does, with
    relu(Conv2d(dim, dim, 3, padding=1)); ``input_drop`` is dropout on the stage's input."""

    def __init__(self, dim: int, grid: int, depths, num_heads, window_size: int, dim_mlp: int, scale: float,
                 drop: float, conv: bool = False, input_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.scale = scale
        self.input_drop = nn.Dropout(input_drop) if input_drop > 0 else nn.Identity()
        rates = drop_path_rates(depths, drop_path)
        mlp_ratio = dim_mlp / dim
        if int(dim * mlp_ratio) != dim_mlp:  # timm takes a ratio: keep the hidden width exact
            mlp_ratio = (dim_mlp + 0.5) / dim
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.layers = nn.ModuleList(
            nn.Sequential(
                *[
                    SwinTransformerBlock(
                        dim=dim, input_resolution=(grid, grid), num_heads=heads, window_size=window_size,
                        shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio,
                        proj_drop=drop, attn_drop=0.0, drop_path=rates[start + i],
                    )
                    for i in range(depth)
                ]
            )
            for depth, heads, start in zip(depths, num_heads, starts)
        )
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in depths) if conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W]
        x = self.input_drop(x)
        if self.convs is None:
            x = x.permute(0, 2, 3, 1)  # timm's Swin blocks take [B, H, W, C]
            for layer in self.layers:
                x = self.scale * layer(x) + x
            return x.permute(0, 3, 1, 2)
        for layer, conv in zip(self.layers, self.convs):
            y = layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            x = self.scale * F.relu(conv(y)) + x
        return x


class MANIQA(nn.Module):
    def __init__(self, cfg: QualityConfig, load_pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(
            cfg.backbone, cfg.layers, cfg.grid, cfg.pretrained if load_pretrained else None, cfg.backbone_kwargs,
            cfg.trainable_stages,
        )
        if cfg.freeze_backbone:
            self.backbone.requires_grad_(False)
            for stage in self.backbone.trainable_modules():
                stage.requires_grad_(True)
        n, d = cfg.grid * cfg.grid, cfg.embed_dim
        self.tab1 = nn.Sequential(*[TransposedAttention(n, cfg.drop, cfg.tab_layout) for _ in range(cfg.num_tab)])
        self.conv1 = nn.Conv2d(self.backbone.out_channels, d, 1)
        swin = dict(
            grid=cfg.grid, depths=cfg.depths, num_heads=cfg.num_heads, window_size=cfg.window_size, scale=cfg.scale,
            drop=cfg.drop if cfg.swin_drop is None else cfg.swin_drop, conv=cfg.stage_conv,
            input_drop=cfg.swin_input_drop, drop_path=cfg.drop_path,
        )
        self.swin1 = SwinStage(d, dim_mlp=cfg.dim_mlp, **swin)
        self.tab2 = nn.Sequential(*[TransposedAttention(n, cfg.drop, cfg.tab_layout) for _ in range(cfg.num_tab)])
        self.conv2 = nn.Conv2d(d, d // 2, 1)
        self.swin2 = SwinStage(d // 2, dim_mlp=cfg.dim_mlp if cfg.shared_dim_mlp else cfg.dim_mlp // 2, **swin)
        self.score_head = nn.Sequential(
            nn.Linear(d // 2, d // 2), nn.ReLU(), nn.Dropout(cfg.drop), nn.Linear(d // 2, 1), nn.ReLU()
        )
        self.weight_head = nn.Sequential(
            nn.Linear(d // 2, d // 2), nn.ReLU(), nn.Dropout(cfg.drop), nn.Linear(d // 2, 1), nn.Sigmoid()
        )

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Backbone feature map [B, C, g, g]. Split out so that a frozen backbone's output can be cached."""
        return self.backbone(pixels)

    def patch_scores(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature map [B, C, g, g] -> per-patch score f and weight w, each [B, g*g]."""
        b, _, g, _ = feats.shape
        if self.cfg.input_norm:
            feats = torch.cat([F.group_norm(f, 1) for f in feats.split(self.backbone.level_channels, dim=1)], dim=1)
        x = self.tab1(feats.flatten(2)).view(b, -1, g, g)
        x = self.swin1(self.conv1(x))
        x = self.tab2(x.flatten(2)).view(b, -1, g, g)
        x = self.swin2(self.conv2(x))
        x = x.flatten(2).transpose(1, 2)  # [B, N, C/2]
        return self.score_head(x).squeeze(-1), self.weight_head(x).squeeze(-1)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """Feature map [B, C, g, g] -> quality vector f * w [B, g*g] (what MA-AGIQA feeds its MoE)."""
        f, w = self.patch_scores(feats)
        return f * w

    def maniqa_score(self, feats: torch.Tensor) -> torch.Tensor:
        """MANIQA's own score of a feature map, sum(f * w) / sum(w) per image: [B]."""
        f, w = self.patch_scores(feats)
        return (f * w).sum(-1) / w.sum(-1)

    @staticmethod
    def pooled_stats(feats: torch.Tensor) -> torch.Tensor:
        """Feature map [B, C, g, g] -> each channel's mean and standard deviation over the grid [B, 2C]."""
        flat = feats.flatten(2)
        return torch.cat([flat.mean(-1), flat.std(-1, unbiased=False)], dim=1)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """views [B, V, 3, s, s] (or [B, 3, s, s]) -> quality vector [B, g*g], the mean over the V views."""
        if views.dim() == 4:
            views = views.unsqueeze(1)
        b, v = views.shape[:2]
        q = self.head(self.features(views.flatten(0, 1)))
        return q.view(b, v, -1).mean(1)


_REFERENCE_BLOCK = re.compile(r"^swintransformer([12])\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_REFERENCE_CONV = re.compile(r"^swintransformer([12])\.layers\.(\d+)\.conv\.(weight|bias)$")
_REFERENCE_TAB = re.compile(r"^tablock([12])\.(\d+)\.c_([qkv])\.(weight|bias)$")
_REFERENCE_SAME = {"conv1", "conv2"}
_REFERENCE_HEADS = {"fc_score": "score_head", "fc_weight": "weight_head"}


def reference_key(key: str) -> str | None:
    """This module's name for a parameter of MANIQA's reference implementation (IIGROUP/MANIQA, MA-AGIQA's
    quality branch, pyiqa's port: their names agree), or None for one this module has no counterpart for
    (the ViT's classifier, each Swin stage's ``downsample`` conv, which the reference builds and never calls).
    Buffers that both sides compute (window masks, relative position indices) map too; callers keep the
    names their own state dict has."""
    if key.startswith("vit."):
        return None if key.startswith("vit.head.") else "backbone.model." + key[len("vit."):]
    if m := _REFERENCE_BLOCK.match(key):
        return f"swin{m[1]}.layers.{m[2]}.{m[3]}.{m[4]}"
    if m := _REFERENCE_CONV.match(key):
        return f"swin{m[1]}.convs.{m[2]}.{m[3]}"
    if m := _REFERENCE_TAB.match(key):
        return f"tab{m[1]}.{m[2]}.{m[3]}.{m[4]}"
    top, _, rest = key.partition(".")
    if top in _REFERENCE_SAME:
        return key
    if top in _REFERENCE_HEADS:
        return f"{_REFERENCE_HEADS[top]}.{rest}"
    return None


def from_reference_state_dict(module: MANIQA, state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """(this module's state dict built from a reference MANIQA state dict, the reference keys left out).

    Every key of ``module`` must be filled, with its own shape; the reference's keys with no counterpart are
    returned, so that a caller sees exactly what was not carried over."""
    own = module.state_dict()
    mapped, left = {}, []
    for key, tensor in state.items():
        name = reference_key(key)
        if name is None or name not in own:
            left.append(key)
            continue
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(f"{key} {tuple(tensor.shape)} does not fit {name} {tuple(own[name].shape)}")
        mapped[name] = tensor
    missing = [k for k in own if k not in mapped]
    if missing:
        raise ValueError(f"the reference state dict has nothing for {missing[:8]} ({len(missing)} keys)")
    return mapped, left
