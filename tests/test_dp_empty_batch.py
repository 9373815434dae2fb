"""An empty Poisson batch is still a DP-SGD step: noise is added and the step is counted.

The accounting (the node's ledger, Opacus' accountant) assumes every one of the
``epochs * ceil(n / batch)`` steps releases a noised sum, including steps whose Poisson draw
selected no record. Skipping those steps releases "no step", which an observer of the update
can tell apart from a noised one, so the sampled-Gaussian bound no longer holds (with
``batch-size = 1`` about 37 % of the steps are empty).
"""

import warnings

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from citydata import load_department
from clients.training import TrainConfig, fit
from privacy.dp import DPSettings, make_private, noise_only_step
from shared_models import build_model, criterion_for, default_model_config

warnings.filterwarnings("ignore", category=UserWarning)

N = 60  # records; batch 1 -> sample rate 1/60, P(no empty batch in 60 draws) ~ 1e-12


def _records(dept: str, n: int = N) -> tuple:
    ds = load_department(dept)
    x, y = ds.site_data(ds.sites[0]).train.tensors().tensors
    return ds, TensorDataset(x[:n], y[:n])


@pytest.mark.parametrize("dept,kind,mode", [
    ("health", None, "auto"),
    ("health", None, "hooks"),
    ("health", None, "ghost"),
    ("traffic", "gru", "auto"),
    ("traffic", "patchtst", "auto"),
])
def test_every_poisson_batch_is_a_noised_step(dept, kind, mode):
    ds, data = _records(dept)
    model = build_model(default_model_config(ds.schema, kind))
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, grad_sample_mode=mode)
    result = fit(model, data, ds.schema.task, TrainConfig(epochs=1, batch_size=1, lr=1e-3), dp)
    # as many steps as the node accounts: epochs * ceil(n / batch)
    assert result.steps == N
    acc = RDPAccountant()
    acc.history = [(1.0, 1.0 / N, N)]
    assert result.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "functorch", "ew"])
def test_noise_only_step_noises_every_trainable_parameter(mode):
    ds, data = _records("health", 200)
    torch.manual_seed(0)  # the noise draws (Opacus draws from torch's default generator here)
    model = build_model(default_model_config(ds.schema))
    frozen = list(model.parameters())[-1]  # the output bias: the rest (~270 values) estimate the noise
    frozen.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    sigma, clip = 2.0, 0.5
    private = make_private(model, opt, DataLoader(data, batch_size=20), criterion_for(ds.schema.task),
                           DPSettings(noise_multiplier=sigma, max_grad_norm=clip, delta=1e-5, grad_sample_mode=mode),
                           epochs=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    private.optimizer.zero_grad(set_to_none=True)
    assert noise_only_step(private.optimizer) is True
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    # the clipped sum of an empty batch is zero; what remains is N(0, (sigma * clip)^2) / expected batch
    expected = sigma * clip / private.optimizer.expected_batch_size
    k = grads.numel()
    assert k > 200
    assert abs(float(grads.mean())) < 4 * expected / k**0.5  # zero mean, within 4 standard errors
    assert float(grads.std()) == pytest.approx(expected, rel=4 / (2 * k) ** 0.5)  # std within ~4 standard errors
    assert frozen.grad is None
    private.optimizer.original_optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == p.requires_grad, name
    # Opacus' own accountant (PrivateTraining.epsilon reads it) saw one step at the loader's rate
    assert private.engine.accountant.history == [(sigma, 1.0 / 10, 1)]
