"""Ensembles inside one checkpoint (``EnsembleConfig``): extra MoE heads of other seeds and a ridge probe on the
pooled backbone statistics, read from the same backbone maps as the model's own head, averaged in its forward.

The probe is the one ``benchmarks/linear_probe.py`` measures: each channel's mean and standard deviation over
the grid, standardised, a ridge regression on MOS whose strength is chosen on a val part by SRCC + PLCC.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import ModelConfig
from .maniqa import MANIQA
from .moe import MoEHead

ALPHAS = tuple(10.0 ** k for k in range(-2, 5))


class Probe(nn.Module):
    """A fitted ridge regression on pooled statistics [B, D] -> MOS [B] (raw units): its standardisation and
    weights are buffers, so they travel in the checkpoint."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("weight", torch.zeros(dim))
        self.register_buffer("bias", torch.zeros(()))

    def forward(self, stats: torch.Tensor) -> torch.Tensor:
        return ((stats.float() - self.mean) / self.scale) @ self.weight + self.bias

    def set(self, mean, scale, weight, bias) -> "Probe":
        for name, value in (("mean", mean), ("scale", scale), ("weight", weight), ("bias", bias)):
            getattr(self, name).copy_(torch.as_tensor(np.asarray(value), dtype=torch.float32))
        return self


class Member(nn.Module):
    """One more head of an ensemble: a MANIQA head and an MoE, on the model's own (shared, frozen) backbone,
    which is held without being registered, so that it is neither stored nor counted twice."""

    def __init__(self, cfg: ModelConfig, backbone: nn.Module):
        super().__init__()
        self.quality = MANIQA(cfg.quality, load_pretrained=False)
        del self.quality.backbone
        object.__setattr__(self.quality, "backbone", backbone)
        self.moe = MoEHead(cfg.moe)


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple:
    """(mean, scale, weight, bias) of a ridge regression of y on standardised x."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    weight = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return mean, scale, weight, y.mean()


def fit_probe(x_train, y_train, x_val, y_val, alphas=ALPHAS) -> tuple[tuple, float]:
    """The ridge fitted on the train part with the strength that scores best (SRCC + PLCC) on the val part:
    ((mean, scale, weight, bias), alpha)."""
    from .metrics import iqa_metrics

    def quality(alpha):
        mean, scale, weight, bias = fit_ridge(x_train, y_train, alpha)
        m = iqa_metrics(((np.asarray(x_val) - mean) / scale) @ weight + bias, np.asarray(y_val))
        s = m["srcc"] + m["plcc"]
        return -np.inf if np.isnan(s) else s

    alpha = max(alphas, key=quality)
    return fit_ridge(x_train, y_train, alpha), alpha
