"""The quality branch: MANIQA (Yang et al., CVPRW 2022) as MA-AGIQA uses it.

backbone features [B, C, g, g] -> transposed-attention blocks -> 1x1 conv -> Swin stage -> transposed attention
-> 1x1 conv -> Swin stage -> per-patch score f and weight w -> the quality vector f * w, g*g wide (784 for
ViT-B/8 at 224 px). MANIQA's own score is sum(f * w) / sum(w); MA-AGIQA feeds the vector to its MoE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from .backbones import create_backbone
from .config import QualityConfig


class TransposedAttention(nn.Module):
    """Attention across channels: tokens are the C channels, each a vector of the N = g*g patch values."""

    def __init__(self, num_patches: int, drop: float = 0.1):
        super().__init__()
        self.q = nn.Linear(num_patches, num_patches)
        self.k = nn.Linear(num_patches, num_patches)
        self.v = nn.Linear(num_patches, num_patches)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, N]
        attn = F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))  # [B, C, N]
        return x + self.drop(attn)


class SwinStage(nn.Module):
    """MANIQA's Swin stage: layers of alternating (shifted) window blocks, each layer added back with
    ``scale``: x = scale * layer(x) + x."""

    def __init__(self, dim: int, grid: int, depths, num_heads, window_size: int, dim_mlp: int, scale: float, drop: float):
        super().__init__()
        self.scale = scale
        self.layers = nn.ModuleList(
            nn.Sequential(
                *[
                    SwinTransformerBlock(
                        dim=dim, input_resolution=(grid, grid), num_heads=heads, window_size=window_size,
                        shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=dim_mlp / dim,
                        proj_drop=drop, attn_drop=0.0, drop_path=0.0,
                    )
                    for i in range(depth)
                ]
            )
            for depth, heads in zip(depths, num_heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W]
        x = x.permute(0, 2, 3, 1)  # timm's Swin blocks take [B, H, W, C]
        for layer in self.layers:
            x = self.scale * layer(x) + x
        return x.permute(0, 3, 1, 2)


class MANIQA(nn.Module):
    def __init__(self, cfg: QualityConfig, load_pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(
            cfg.backbone, cfg.layers, cfg.grid, cfg.pretrained if load_pretrained else None, cfg.backbone_kwargs
        )
        if cfg.freeze_backbone:
            self.backbone.requires_grad_(False)
        n, d = cfg.grid * cfg.grid, cfg.embed_dim
        self.tab1 = nn.Sequential(*[TransposedAttention(n, cfg.drop) for _ in range(cfg.num_tab)])
        self.conv1 = nn.Conv2d(self.backbone.out_channels, d, 1)
        self.swin1 = SwinStage(d, cfg.grid, cfg.depths, cfg.num_heads, cfg.window_size, cfg.dim_mlp, cfg.scale, cfg.drop)
        self.tab2 = nn.Sequential(*[TransposedAttention(n, cfg.drop) for _ in range(cfg.num_tab)])
        self.conv2 = nn.Conv2d(d, d // 2, 1)
        self.swin2 = SwinStage(
            d // 2, cfg.grid, cfg.depths, cfg.num_heads, cfg.window_size, cfg.dim_mlp // 2, cfg.scale, cfg.drop
        )
        self.score_head = nn.Sequential(
            nn.Linear(d // 2, d // 2), nn.ReLU(), nn.Dropout(cfg.drop), nn.Linear(d // 2, 1), nn.ReLU()
        )
        self.weight_head = nn.Sequential(
            nn.Linear(d // 2, d // 2), nn.ReLU(), nn.Dropout(cfg.drop), nn.Linear(d // 2, 1), nn.Sigmoid()
        )

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Backbone feature map [B, C, g, g]. Split out so that a frozen backbone's output can be cached."""
        return self.backbone(pixels)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """Feature map [B, C, g, g] -> quality vector [B, g*g]."""
        b, _, g, _ = feats.shape
        if self.cfg.input_norm:
            feats = torch.cat([F.group_norm(f, 1) for f in feats.split(self.backbone.level_channels, dim=1)], dim=1)
        x = self.tab1(feats.flatten(2)).view(b, -1, g, g)
        x = self.swin1(self.conv1(x))
        x = self.tab2(x.flatten(2)).view(b, -1, g, g)
        x = self.swin2(self.conv2(x))
        x = x.flatten(2).transpose(1, 2)  # [B, N, C/2]
        return (self.score_head(x) * self.weight_head(x)).squeeze(-1)  # [B, N]

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """views [B, V, 3, s, s] (or [B, 3, s, s]) -> quality vector [B, g*g], the mean over the V views."""
        if views.dim() == 4:
            views = views.unsqueeze(1)
        b, v = views.shape[:2]
        q = self.head(self.features(views.flatten(0, 1)))
        return q.view(b, v, -1).mean(1)
