"""Criteria that return one loss per sample when ``reduction='none'``.

Opacus ghost clipping sets ``criterion.reduction = 'none'`` and needs a ``(batch,)`` loss;
torch's ``MSELoss`` would return ``(batch, horizon)``.
"""

from __future__ import annotations

import torch
from torch import nn


class PerSampleMSE(nn.Module):
    """Mean squared error over the horizon, per sample (``reduction`` in {'mean','sum','none'})."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per = ((pred - target) ** 2).reshape(pred.shape[0], -1).mean(dim=1)
        if self.reduction == "none":
            return per
        return per.sum() if self.reduction == "sum" else per.mean()


class PerSampleBCEWithLogits(nn.BCEWithLogitsLoss):
    """``BCEWithLogitsLoss`` on ``(batch,)`` logits; ``reduction='none'`` already gives ``(batch,)``."""


def criterion_for(task: str) -> nn.Module:
    """Training criterion for a dataset task (``binary-classification`` or ``forecasting``)."""
    if task == "binary-classification":
        return PerSampleBCEWithLogits()
    if task == "forecasting":
        return PerSampleMSE()
    raise ValueError(f"unknown task {task!r}")
