"""Recurrent forecaster built on Opacus' DPGRU (per-sample gradients work under DP-SGD)."""

from __future__ import annotations

import torch
from opacus.layers import DPGRU
from torch import nn

from shared_models.configs import GRUForecasterConfig


class GRUForecaster(nn.Module):
    """GRU encoder over the lookback window, linear head to ``horizon`` steps.

    The head predicts a correction to a naive forecast (seasonal when ``seasonal_period``
    fits in the lookback, else persistence), which makes that naive forecast the model's
    starting point.

    Parameters
    ----------
    config : GRUForecasterConfig
        Channels, lookback, horizon, hidden size, layers.
    """

    def __init__(self, config: GRUForecasterConfig):
        super().__init__()
        self.config = config
        self.rnn = DPGRU(config.n_features, config.hidden, num_layers=config.layers, batch_first=True)
        self.head = nn.Linear(config.hidden + config.n_features, config.horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forecast: ``x`` is ``(batch, lookback, n_features)``; returns ``(batch, horizon)``."""
        out, _ = self.rnn(x)
        last = x[:, -1, :]
        return baseline(x, self.config) + self.head(torch.cat([out[:, -1, :], last], dim=-1))


def baseline(x: torch.Tensor, config) -> torch.Tensor:
    """Naive forecast the models correct: seasonal (one period back) when configured, else persistence."""
    L, H, P = config.lookback, config.horizon, config.seasonal_period
    if P and H <= P <= L:
        return x[:, L - P : L - P + H, 0]
    return x[:, -1:, 0].expand(-1, H)
