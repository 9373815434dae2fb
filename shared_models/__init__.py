"""Models that the coordinator and every department node load.

Each model is a small ``nn.Module`` built from a small pydantic config object, and every
model passes Opacus' ``ModuleValidator.validate`` (no BatchNorm, DP-compatible RNN cells),
so the same weights can be trained with or without DP-SGD and averaged by Flower.

>>> from shared_models import build_model, HeartClassifierConfig
>>> model = build_model(HeartClassifierConfig(n_features=13))
"""

from shared_models.configs import (
    GRUForecasterConfig,
    HeartClassifierConfig,
    ModelConfig,
    PatchTSTForecasterConfig,
    default_model_config,
    model_kinds,
)
from shared_models.gru import GRUForecaster
from shared_models.heart import HeartClassifier
from shared_models.losses import PerSampleBCEWithLogits, PerSampleMSE, criterion_for
from shared_models.patchtst import PatchTSTForecaster

__all__ = [
    "GRUForecaster",
    "GRUForecasterConfig",
    "HeartClassifier",
    "HeartClassifierConfig",
    "ModelConfig",
    "PatchTSTForecaster",
    "PatchTSTForecasterConfig",
    "PerSampleBCEWithLogits",
    "PerSampleMSE",
    "build_model",
    "criterion_for",
    "default_model_config",
    "model_kinds",
]


def build_model(config: ModelConfig):
    """Build the model described by ``config``.

    Parameters
    ----------
    config : ModelConfig
        One of :class:`HeartClassifierConfig`, :class:`GRUForecasterConfig`,
        :class:`PatchTSTForecasterConfig`.

    Returns
    -------
    torch.nn.Module
        A freshly initialised model (seed torch beforehand for reproducible weights).
    """
    builders = {
        "heart-mlp": HeartClassifier,
        "gru": GRUForecaster,
        "patchtst": PatchTSTForecaster,
    }
    return builders[config.kind](config)
