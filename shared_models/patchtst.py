"""Transformer forecaster: transformers' PatchTSTForPrediction, built from a config.

No weights are downloaded: the model is initialised from ``PatchTSTConfig``. LayerNorm
replaces BatchNorm so Opacus can compute per-sample gradients.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PatchTSTConfig, PatchTSTForPrediction

from shared_models.configs import PatchTSTForecasterConfig
from shared_models.gru import baseline


class PatchTSTForecaster(nn.Module):
    """PatchTST over the first ``input_channels`` channels; returns the target channel's forecast.

    Parameters
    ----------
    config : PatchTSTForecasterConfig
        Lookback, horizon, patching and transformer sizes.
    """

    def __init__(self, config: PatchTSTForecasterConfig):
        super().__init__()
        self.config = config
        hf = PatchTSTConfig(
            num_input_channels=config.input_channels,
            context_length=config.lookback,
            prediction_length=config.horizon,
            patch_length=config.patch_length,
            patch_stride=config.patch_stride,
            d_model=config.d_model,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            ffn_dim=config.ffn_dim,
            norm_type="layernorm",
            dropout=config.dropout,
            attention_dropout=config.dropout,
            ff_dropout=config.dropout,
            head_dropout=config.dropout,
            positional_dropout=config.dropout,
            path_dropout=0.0,
            scaling=None if config.scaling == "none" else config.scaling,
            positional_encoding_type="sincos",
            loss="mse",
        )
        self.model = PatchTSTForPrediction(hf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forecast: ``x`` is ``(batch, lookback, n_features)``; returns ``(batch, horizon)``."""
        past = x[:, :, : self.config.input_channels]
        out = self.model(past_values=past).prediction_outputs[:, :, 0]
        if self.config.seasonal_period:
            out = out + baseline(x, self.config)
        return out
