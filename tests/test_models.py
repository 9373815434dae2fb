"""Shared models: built from configs, DP-compatible, right output shapes."""

import pytest
import torch
from opacus.validators import ModuleValidator
from pydantic import ValidationError

from shared_models import (
    GRUForecasterConfig,
    HeartClassifierConfig,
    PatchTSTForecasterConfig,
    PerSampleMSE,
    build_model,
)

CONFIGS = [
    (HeartClassifierConfig(n_features=13), (8, 13), (8,)),
    (HeartClassifierConfig(n_features=13, hidden=()), (8, 13), (8,)),
    (GRUForecasterConfig(n_features=5, lookback=32, horizon=4), (8, 32, 5), (8, 4)),
    (GRUForecasterConfig(n_features=7, lookback=72, horizon=24, layers=2), (8, 72, 7), (8, 24)),
    (PatchTSTForecasterConfig(n_features=5, lookback=32, horizon=4), (8, 32, 5), (8, 4)),
    (PatchTSTForecasterConfig(n_features=7, lookback=72, horizon=24, input_channels=2), (8, 72, 7), (8, 24)),
]


@pytest.mark.parametrize("config,xshape,yshape", CONFIGS, ids=lambda c: getattr(c, "kind", None))
def test_model_is_dp_compatible_and_shapes(config, xshape, yshape):
    model = build_model(config)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    out = model(torch.randn(*xshape))
    assert out.shape == yshape
    assert torch.isfinite(out).all()


def test_same_seed_same_weights():
    cfg = GRUForecasterConfig(n_features=5, lookback=32, horizon=4)
    torch.manual_seed(3)
    a = build_model(cfg).state_dict()
    torch.manual_seed(3)
    b = build_model(cfg).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="n_features"):
        HeartClassifierConfig(n_features=0)
    with pytest.raises(ValidationError, match="horizon"):
        GRUForecasterConfig(n_features=3, lookback=4, horizon=-1)
    with pytest.raises(ValidationError, match="unknown_field|extra"):
        PatchTSTForecasterConfig(n_features=1, lookback=32, horizon=4, unknown_field=1)


def test_per_sample_mse_reductions():
    pred, target = torch.randn(6, 4), torch.randn(6, 4)
    crit = PerSampleMSE()
    per = PerSampleMSE(reduction="none")(pred, target)
    assert per.shape == (6,)
    assert torch.allclose(crit(pred, target), torch.nn.functional.mse_loss(pred, target))
    assert torch.allclose(per.mean(), crit(pred, target))
