"""Health classifier: a small MLP (or logistic regression) on tabular patient features."""

from __future__ import annotations

import torch
from torch import nn

from shared_models.configs import HeartClassifierConfig


class HeartClassifier(nn.Module):
    """MLP returning one logit per patient (heart disease present).

    Parameters
    ----------
    config : HeartClassifierConfig
        Feature count, hidden widths, dropout.
    """

    def __init__(self, config: HeartClassifierConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.n_features
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(batch,)``."""
        return self.net(x).squeeze(-1)
