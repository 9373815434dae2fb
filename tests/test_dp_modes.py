"""Opacus per-sample-gradient modes: each computes hooks' clipped gradient; ``auto`` picks the table's mode,
falls back when Opacus refuses one, and Poisson batches are Opacus' draws fetched by tensor indexing."""

import copy
import logging

import pytest
import torch
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clients.training import TrainConfig, fit
from privacy.dp import DPSettings, make_private
from privacy import grad_modes
from privacy.grad_modes import AUTO_MODES, GRAD_SAMPLE_MODES, NoUsableModeError, candidate_modes, usable_mode
from privacy.poisson_loader import TensorPoissonLoader
from shared_models import (
    GRUForecasterConfig,
    HeartClassifierConfig,
    PatchTSTForecasterConfig,
    PerSampleBCEWithLogits,
    PerSampleMSE,
    build_model,
)

SHIPPED = {
    "heart-mlp": (HeartClassifierConfig(n_features=13), (32, 13), "binary-classification"),
    "gru": (GRUForecasterConfig(n_features=5, lookback=16, horizon=4), (32, 16, 5), "forecasting"),
    "patchtst": (PatchTSTForecasterConfig(n_features=5, lookback=32, horizon=4), (32, 32, 5), "forecasting"),
}


def _batch(kind, seed=0):
    cfg, shape, task = SHIPPED[kind]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    y = (torch.rand(shape[0], generator=g) > 0.5).float() if task == "binary-classification" else torch.randn(shape[0], 4, generator=g) * 5
    return x, y


def _criterion(kind):
    return PerSampleBCEWithLogits() if SHIPPED[kind][2] == "binary-classification" else PerSampleMSE()


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _one_clipped_step(kind, mode, clip=0.05, freeze_first_half=False):
    """Weights moved by one noise-free DP-SGD step (SGD, lr 1) on a fixed full batch, in ``mode``."""
    torch.manual_seed(0)
    model = build_model(SHIPPED[kind][0])
    if freeze_first_half:  # as TrainConfig.trainable does (personalisation: a shared body stays frozen)
        params = list(model.parameters())
        for q in params[: len(params) // 2]:
            q.requires_grad_(False)
    before = _flat(model).clone()
    x, y = _batch(kind)
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1.0)
    p = make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=len(x)), _criterion(kind),
                     DPSettings(noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode=mode), epochs=1)
    assert p.grad_sample_mode == mode
    p.optimizer.zero_grad()
    p.criterion(p.module(x), y).backward()
    p.optimizer.expected_batch_size = len(x)
    p.optimizer.step()
    return _flat(model) - before


@pytest.mark.parametrize("kind", list(SHIPPED))
@pytest.mark.parametrize("mode", ["ghost", "functorch", "ew"])
def test_each_mode_applies_the_same_clipped_gradient_as_hooks(kind, mode):
    """Clipping active (C small): every mode's step equals hooks' step, so no mode weakens clipping."""
    ref = _one_clipped_step(kind, "hooks")
    got = _one_clipped_step(kind, mode)
    assert ref.norm() > 0
    assert ref.norm() <= 0.05 * 1.0001  # mean of per-sample grads clipped to C
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", list(SHIPPED))
def test_expanded_weights_with_frozen_parameters_applies_hooks_gradient(kind):
    ref = _one_clipped_step(kind, "hooks", freeze_first_half=True)
    got = _one_clipped_step(kind, "ew", freeze_first_half=True)
    assert ref.norm() > 0 and (ref == 0).any()  # the frozen half did not move
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", list(SHIPPED))
def test_auto_trains_each_shipped_model_with_its_table_mode(kind):
    cfg, shape, task = SHIPPED[kind]
    x, y = _batch(kind)
    res = fit(build_model(cfg), TensorDataset(x.repeat(4, *[1] * (x.dim() - 1)), y.repeat(4, *[1] * (y.dim() - 1))),
              task, TrainConfig(epochs=1, batch_size=32), DPSettings(noise_multiplier=1.0))
    assert res.grad_sample_mode == AUTO_MODES[kind][0]
    assert candidate_modes(build_model(cfg), "auto")[-1] == "hooks"


class _Kind:
    def __init__(self, kind):
        self.kind = kind


class RawWeightNet(nn.Module):
    """A weight applied with ``@``: expanded weights cannot handle ``matmul`` (hooks use functorch for it)."""

    def __init__(self):
        super().__init__()
        self.config = _Kind("raw-weight-test")
        self.w = nn.Parameter(torch.randn(13, 8) * 0.3)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.tanh(x @ self.w)).squeeze(-1)


class TiedNet(nn.Module):
    """One ``nn.Linear`` applied twice per forward pass: ghost clipping refuses parameter tying."""

    def __init__(self):
        super().__init__()
        self.config = _Kind("tied-test")
        self.lin = nn.Linear(13, 13)
        self.out = nn.Linear(13, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x))))).squeeze(-1)


def _data(n=256):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 13, generator=g)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).float())


@pytest.mark.parametrize("net,first", [(RawWeightNet, "ew"), (TiedNet, "ghost")], ids=["ew-refuses", "ghost-refuses"])
def test_auto_falls_back_when_opacus_refuses_the_first_mode_and_still_trains_with_noise(net, first, monkeypatch, caplog):
    monkeypatch.setenv("CITYFED_DP_SEED_FROM_JOB", "1")  # the same Poisson batches in both runs
    monkeypatch.setitem(AUTO_MODES, net().config.kind, (first, "hooks"))
    monkeypatch.setattr(grad_modes, "_USABLE", {})  # probe afresh (the refusal is logged once)
    torch.manual_seed(0)
    base = net()
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, seed=11)
    clean, noisy = copy.deepcopy(base), copy.deepcopy(base)
    with caplog.at_level(logging.WARNING, logger="cityfed.dp"):
        r0 = fit(clean, _data(), "binary-classification", cfg, DPSettings(noise_multiplier=0.0, max_grad_norm=1.0))
    assert r0.grad_sample_mode == "hooks"
    assert any(first in rec.getMessage() and "'hooks'" in rec.getMessage() for rec in caplog.records)
    r1 = fit(noisy, _data(), "binary-classification", cfg, DPSettings(noise_multiplier=2.0, max_grad_norm=1.0))
    assert r1.grad_sample_mode == "hooks" and r1.steps == r0.steps == 8
    assert (_flat(clean) - _flat(base)).norm() > 0  # it trained
    assert (_flat(noisy) - _flat(clean)).norm() > 0.05  # same batches: the difference is the noise
    assert r1.epsilon is not None and r1.epsilon > 0


def test_the_probe_runs_once_per_architecture(monkeypatch):
    monkeypatch.setattr(grad_modes, "_USABLE", {})
    calls = []
    real_probe = grad_modes.probe

    def counting_probe(*args, **kwargs):
        calls.append(args[3])
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(grad_modes, "probe", counting_probe)
    monkeypatch.setitem(AUTO_MODES, "tied-test", ("ghost", "hooks"))
    assert usable_mode(TiedNet(), PerSampleBCEWithLogits(), _data(), ("ghost", "hooks"), 1.0) == "hooks"
    assert calls == ["ghost", "hooks"]
    assert usable_mode(TiedNet(), PerSampleBCEWithLogits(), _data(), ("ghost", "hooks"), 1.0) == "hooks"
    assert calls == ["ghost", "hooks"]  # remembered: the same architecture
    frozen = TiedNet()
    frozen.lin.requires_grad_(False)  # the tied layer frozen: ghost clipping accepts it
    assert usable_mode(frozen, PerSampleBCEWithLogits(), _data(), ("ghost", "hooks"), 1.0) == "ghost"
    assert calls == ["ghost", "hooks", "ghost"]


def test_no_usable_mode_names_each_refusal():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(13, 13) * 0.3)

        def forward(self, x):
            return x @ self.w

    class Both(TiedNet):  # tied (ghost refuses) and a raw matmul weight (ew refuses)
        def __init__(self):
            super().__init__()
            self.raw = Raw()

        def forward(self, x):
            return super().forward(self.raw(x))

    with pytest.raises(NoUsableModeError, match=r"ghost: NotImplementedError.*ew: RuntimeError.*matmul"):
        usable_mode(Both(), PerSampleBCEWithLogits(), _data(), ("ghost", "ew"), 1.0)


def test_explicit_mode_is_used_as_given_and_unknown_modes_are_refused():
    assert candidate_modes(TiedNet(), "ghost") == ("ghost",)
    assert set(GRAD_SAMPLE_MODES) == {"hooks", "ghost", "functorch", "ew"}
    with pytest.raises(ValueError, match="grad_sample_mode"):
        candidate_modes(TiedNet(), "vmap")
    with pytest.raises(ValueError):
        DPSettings(noise_multiplier=1.0, grad_sample_mode="vmap")


def test_tensor_poisson_loader_yields_the_opacus_samplers_draws():
    n = 500
    ds = TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n) % 2)

    def dp_loader():
        return DPDataLoader.from_data_loader(DataLoader(ds, batch_size=25, generator=torch.Generator().manual_seed(7)))

    mine = TensorPoissonLoader(dp_loader())
    assert len(mine) == 20 and mine.sample_rate == pytest.approx(1 / 20)
    got = [(x.squeeze(1).long().tolist(), y.tolist()) for x, y in mine]
    expected = list(dp_loader().batch_sampler)  # the same sampler, the same generator seed
    assert [g[0] for g in got] == expected
    assert all(y == [i % 2 for i in idx] for idx, y in got)
    assert len({len(b) for b in expected}) > 3  # Poisson: the batch size varies


def test_tensor_poisson_loader_empty_draw_has_a_zero_batch_dimension():
    ds = TensorDataset(torch.randn(3, 4, 2), torch.randn(3, 5))
    loader = TensorPoissonLoader(DPDataLoader.from_data_loader(DataLoader(ds, batch_size=1,
                                                                          generator=torch.Generator().manual_seed(0))))
    batches = [b for _ in range(20) for b in loader]
    empty = [b for b in batches if len(b[0]) == 0]
    assert empty, "with sample rate 1/3 on 3 records some draws are empty"
    assert empty[0][0].shape == (0, 4, 2) and empty[0][1].shape == (0, 5) and empty[0][0].dtype == torch.float32


def test_make_private_keeps_opacus_loader_for_other_datasets_and_sampling_rate_is_unchanged():
    data = _data()
    model = build_model(HeartClassifierConfig(n_features=13))
    p = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=32),
                     PerSampleBCEWithLogits(), DPSettings(noise_multiplier=1.0), epochs=1)
    assert isinstance(p.loader, TensorPoissonLoader) and len(p.loader) == 8 and p.sample_rate == 1 / 8

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    model = build_model(HeartClassifierConfig(n_features=13))
    p = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(Plain(), batch_size=32),
                     PerSampleBCEWithLogits(), DPSettings(noise_multiplier=1.0), epochs=1)
    assert isinstance(p.loader, DPDataLoader) and p.sample_rate == 1 / 8
