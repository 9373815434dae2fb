"""shared_models.ensemble.MeanEnsemble: the mean of its members' predictions, as one model."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from shared_models.ensemble import MeanEnsemble


class Fixed(nn.Module):
    """A member whose output is a fixed tensor (whatever the input)."""

    def __init__(self, out):
        super().__init__()
        self.out = nn.Parameter(torch.as_tensor(out, dtype=torch.float64), requires_grad=False)

    def forward(self, x):
        return self.out.expand(len(x), -1)


logits = st.lists(st.floats(-200, 200, allow_nan=False), min_size=3, max_size=3)


@settings(max_examples=300, deadline=None)
@given(a=logits, b=logits)
def test_classification_returns_the_logit_of_the_mean_probability_finite_and_between_the_members(a, b):
    ens = MeanEnsemble([Fixed([a]), Fixed([b])], "binary-classification")
    out = ens(torch.zeros(1, 4))[0].double()
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    lo, hi = torch.minimum(ta, tb), torch.maximum(ta, tb)
    tol = 1e-9 * (1 + out.abs())
    assert torch.isfinite(out).all()
    assert (out >= lo - tol).all() and (out <= hi + tol).all()
    p = (torch.sigmoid(ta) + torch.sigmoid(tb)) / 2
    assert torch.allclose(torch.sigmoid(out), p, atol=1e-12)
    for i in range(3):  # where the naive formula is finite, the same number
        if 1e-6 < float(p[i]) < 1 - 1e-6:  # (nearer 0 or 1, 1 - p itself loses the digits)
            assert float(out[i]) == pytest.approx(math.log(p[i] / (1 - p[i])), abs=1e-6)


def test_forecasting_averages_the_outputs_and_the_state_dict_names_each_member():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 2), nn.Linear(4, 2)
    ens = MeanEnsemble([a, b], "forecasting")
    x = torch.randn(5, 4)
    assert torch.allclose(ens(x), (a(x) + b(x)) / 2)
    assert sorted(ens.state_dict()) == ["members.0.bias", "members.0.weight", "members.1.bias", "members.1.weight"]


def test_needs_a_member():
    with pytest.raises(ValueError, match="at least one member"):
        MeanEnsemble([], "forecasting")
