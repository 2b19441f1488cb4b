"""Mixture of experts fusion: project each expert's vector to one width, gate over them, regress the MOS."""
from __future__ import annotations

import torch
from torch import nn

from .config import MoEConfig


def _after_projection(cfg: MoEConfig, source: str) -> nn.Module:
    if source != "semantic":
        return nn.Identity()
    layers = ([nn.ReLU()] if cfg.semantic_act == "relu" else []) + (
        [nn.Dropout(cfg.semantic_dropout)] if cfg.semantic_dropout > 0 else []
    )
    return nn.Sequential(*layers) if layers else nn.Identity()


class Standardize(nn.BatchNorm1d):
    """BatchNorm1d that uses its running statistics for a training batch of one row (which has none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False,
                                            0.0, self.eps)
        return super().forward(x)


class MoEHead(nn.Module):
    """Experts come from the config's list. An expert missing for an image (no prompt, say) is masked out
    of that image's gate, so the others still score it.

    The reference (MA-AGIQA's MA_AGIQA.forward): each semantic vector through Linear(4096, 784) -> ReLU ->
    Dropout(0.1), the quality vector through Linear(784, 784), a Linear(3 * 784, 3) gate over the
    concatenation without softmax, the gate-weighted sum of the three, Linear(784, 1). ``semantic_act``,
    ``semantic_dropout`` and ``gate="linear"`` give that; ``dropout`` (before the gate and the regressor) is
    ours, 0 in the reference."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.names = [e.name for e in cfg.experts]
        # A stats expert's channels differ in scale by orders of magnitude: standardised first (as a ridge
        # regression on them standardises each), with the batch's statistics in training.
        self.project = nn.ModuleDict({
            e.name: nn.Sequential(Standardize(e.dim), nn.Linear(e.dim, cfg.width)) if e.source == "stats"
            else nn.Linear(e.dim, cfg.width)
            for e in cfg.experts
        })
        self.gate = nn.Linear(cfg.width * len(cfg.experts), len(cfg.experts))
        self.dropout = nn.Dropout(cfg.dropout)
        self.regress = nn.Linear(cfg.width, 1)
        # What follows each projection; parameter-free, so a checkpoint's tensors are the same either way.
        self.after_projection = nn.ModuleDict({e.name: _after_projection(cfg, e.source) for e in cfg.experts})

    def forward(
        self, features: dict[str, torch.Tensor], present: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features: {expert: [B, dim]}; present: {expert: [B] bool}, absent = present for all.

        Returns (score [B], gates [B, E]) with gates in the order of ``self.names``.
        """
        missing = [n for n in self.names if n not in features and (present is None or n not in present)]
        if missing:
            raise KeyError(f"no features for experts {missing}")
        ref = next(iter(features.values()))
        b = ref.shape[0]
        mask = torch.stack(
            [
                present[n].to(ref.device, torch.bool) if present is not None and n in present
                else torch.ones(b, dtype=torch.bool, device=ref.device)
                for n in self.names
            ],
            dim=1,
        )  # [B, E]
        projected = []
        for i, n in enumerate(self.names):
            x = features.get(n)
            p = (
                self.after_projection[n](self.project[n](x.to(self.regress.weight.dtype)))
                if x is not None else ref.new_zeros(b, self.cfg.width)
            )
            projected.append(p * mask[:, i : i + 1])
        experts = torch.stack(projected, dim=1)  # [B, E, W]
        logits = self.gate(self.dropout(experts.flatten(1)))  # [B, E]
        if self.cfg.gate == "softmax":
            gates = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
        else:  # the reference: un-normalised linear weights, which can be negative
            gates = logits * mask
        fused = (gates.unsqueeze(-1) * experts).sum(1)
        return self.regress(self.dropout(fused)).squeeze(-1), gates
