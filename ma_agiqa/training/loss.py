"""The training loss: MSE on normalised MOS plus the optional batch-level terms (PLCC, ranking)."""
from __future__ import annotations

import torch


def training_loss(pred: torch.Tensor, mos: torch.Tensor, mos_std: float, batch_size: int, t) -> torch.Tensor:
    """This share's part of the batch's loss: the MSE on MOS / ``mos_std`` (summed here, divided by the whole
    batch's size, so that workers' shares add up to it), plus the batch-level terms of ``t`` (``plcc_loss``,
    ``rank_loss``), which need the whole batch in one process."""
    err = (pred - mos) / mos_std
    loss = torch.sum(err**2) / batch_size
    if t.plcc_loss and len(pred) > 1:
        p, m = pred - pred.mean(), mos - mos.mean()
        # PLCC's gradient grows as 1 / the predictions' spread: a batch predicted (nearly) alike, as a head
        # starts or a dead ReLU leaves it, has no correlation to follow, and gets the MSE alone.
        if p.detach().std() > 1e-3 * mos_std:
            loss = loss + t.plcc_loss * (1 - torch.sum(p * m) / (p.norm() * m.norm() + 1e-8))
    if t.rank_loss:
        higher = mos[:, None] > mos[None, :]  # pairs (i, j) where i's MOS is above j's
        if higher.any():
            diff = (pred[:, None] - pred[None, :]) / mos_std
            loss = loss + t.rank_loss * torch.nn.functional.softplus(-diff[higher]).mean()
    return loss
