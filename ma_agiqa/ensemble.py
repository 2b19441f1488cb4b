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


def assemble(members: list, probe: tuple | None = None, probe_weight: float = 0.5, name: str | None = None):
    """One model from trained single-head models of the same config (seeds apart) and, optionally, a fitted
    probe ((mean, scale, weight, bias) from ``fit_probe``): the first model's config with ``ensemble`` set, its
    weights and the others' heads. Save it with ``save_pretrained``; ``from_pretrained`` loads it."""
    from .config import EnsembleConfig, ModelConfig
    from .model import MAAGIQA

    first = members[0]
    backbone = first.quality.backbone.state_dict()
    for m in members[1:]:
        if (m.cfg.quality, m.cfg.moe, m.cfg.mos_mean, m.cfg.mos_std) != (
                first.cfg.quality, first.cfg.moe, first.cfg.mos_mean, first.cfg.mos_std):
            raise ValueError("ensemble members must share the config and the MOS normalisation (the same training data)")
        if any(not torch.equal(v, backbone[k]) for k, v in m.quality.backbone.state_dict().items()):
            raise ValueError("ensemble members must share the backbone's weights")
    d = first.cfg.to_dict()
    d["name"] = name or first.cfg.name
    cfg = ModelConfig.from_dict(d)
    cfg.ensemble = EnsembleConfig(heads=len(members), probe=probe is not None, probe_weight=probe_weight)
    if first.cfg.semantic is not None:
        cfg.semantic._base_dir = getattr(first.cfg.semantic, "_base_dir", None)
        cfg.semantic._width = first.cfg.semantic._width
    model = MAAGIQA(cfg, first.semantic, first.prompt_encoder, load_pretrained_backbone=False, base_dir=first.base_dir)
    model.quality.load_state_dict(first.quality.state_dict())  # the backbone too: the members' shared one
    model.moe.load_state_dict(first.moe.state_dict())
    for head, m in zip(model.heads, members[1:]):
        head.quality.load_state_dict({k: v for k, v in m.quality.state_dict().items() if not k.startswith("backbone.")})
        head.moe.load_state_dict(m.moe.state_dict())
    if probe is not None:
        model.probe.set(*probe)
    return model.to(next(first.parameters()).device).eval()
