"""The DP path really clips, adds noise, and reports the accountant's epsilon."""

import copy

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from clients.training import TrainConfig, fit
from privacy.dp import DPSettings, calibrate_noise, default_delta, rdp_epsilon
from shared_models import GRUForecasterConfig, HeartClassifierConfig, PatchTSTForecasterConfig, build_model


def _data(n=256, f=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g)
    w = torch.randn(f, generator=g)
    y = ((x @ w) > 0).float()
    return TensorDataset(x, y)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_reported_epsilon_matches_independent_accountant():
    data = _data()
    model = build_model(HeartClassifierConfig(n_features=13))
    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e-2)
    res = fit(model, data, "binary-classification", cfg, DPSettings(target_epsilon=2.0))
    steps_per_epoch = 256 // 32
    assert res.sample_rate == pytest.approx(1 / steps_per_epoch)
    assert res.delta == pytest.approx(default_delta(256))
    acc = RDPAccountant()
    for _ in range(cfg.epochs * steps_per_epoch):
        acc.step(noise_multiplier=res.noise_multiplier, sample_rate=res.sample_rate)
    independent = acc.get_epsilon(delta=res.delta)
    assert res.epsilon == pytest.approx(independent, rel=1e-9)
    # calibrated to the target, from below
    assert res.epsilon <= 2.0 and res.epsilon > 1.8
    assert res.noise_multiplier == pytest.approx(calibrate_noise(2.0, res.delta, res.sample_rate, 24))
    assert rdp_epsilon([(res.noise_multiplier, res.sample_rate, 24)], res.delta) == pytest.approx(independent)


def test_small_epsilon_run_differs_from_non_private():
    data = _data()
    torch.manual_seed(0)
    base = build_model(HeartClassifierConfig(n_features=13))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-2, seed=1)
    fit(a, data, "binary-classification", cfg, None)
    res = fit(b, data, "binary-classification", cfg, DPSettings(target_epsilon=0.5))
    assert res.noise_multiplier > 1.0
    assert (_flat(a) - _flat(b)).norm() > 0.1


class _RecordingSGD(torch.optim.SGD):
    """Stands in for fit()'s Adam: records each step's gradients (after Opacus' clip + noise)."""

    steps: list = []

    def __init__(self, params, lr=1e-2, weight_decay=0.0):
        super().__init__(params, lr=lr, weight_decay=weight_decay)

    def step(self, closure=None):
        _RecordingSGD.steps.append(torch.cat([p.grad.detach().flatten().clone() for g in self.param_groups
                                              for p in g["params"] if p.grad is not None]))
        return super().step(closure)


def _first_step_grad(monkeypatch, settings, data, model, batch=32):
    """The gradient fit() applied at its first step, through the code path a node uses."""
    monkeypatch.setattr(torch.optim, "Adam", _RecordingSGD)
    _RecordingSGD.steps = []
    fit(copy.deepcopy(model), data, "binary-classification", TrainConfig(epochs=1, batch_size=batch, lr=1e-2, seed=5),
        settings)
    return _RecordingSGD.steps[0]


def test_noise_is_added_at_the_calibrated_scale(monkeypatch):
    """Same Poisson batch (job-seeded sampling), noise 0 vs sigma: the difference is the noise alone.

    Opacus adds N(0, (sigma*C)^2) to the sum of clipped per-sample gradients and divides by the
    expected batch size B, so each coordinate of the difference has std sigma*C/B. Runs alone:
    it sets the seeding switch itself (without it, sampling differs and noise 0 would pass).
    """
    monkeypatch.setenv("CITYFED_DP_SEED_FROM_JOB", "1")
    data = _data(n=256)
    torch.manual_seed(0)
    model = build_model(HeartClassifierConfig(n_features=13, hidden=(64, 32)))
    sigma, clip, batch = 1.5, 0.5, 32
    clean = _first_step_grad(monkeypatch, DPSettings(noise_multiplier=0.0, max_grad_norm=clip), data, model, batch)
    again = _first_step_grad(monkeypatch, DPSettings(noise_multiplier=0.0, max_grad_norm=clip), data, model, batch)
    assert torch.allclose(clean, again)  # the same batch: the comparison below isolates the noise
    noisy = _first_step_grad(monkeypatch, DPSettings(noise_multiplier=sigma, max_grad_norm=clip), data, model, batch)
    noise = noisy - clean
    assert noise.numel() > 1000
    assert noise.std().item() == pytest.approx(sigma * clip / batch, rel=0.1)
    assert abs(noise.mean().item()) < 4 * sigma * clip / batch / noise.numel() ** 0.5


def test_fit_clips_per_sample_gradients(monkeypatch):
    """Noise 0, clip C: the applied gradient is a mean of per-sample gradients of norm <= C (B = 32)."""
    monkeypatch.setenv("CITYFED_DP_SEED_FROM_JOB", "1")
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(256, 13, generator=g) * 30, (torch.rand(256, generator=g) > 0.5).float())
    torch.manual_seed(0)
    model = build_model(HeartClassifierConfig(n_features=13))
    clip = 0.01
    unclipped = _first_step_grad(monkeypatch, None, data, model)
    clipped = _first_step_grad(monkeypatch, DPSettings(noise_multiplier=0.0, max_grad_norm=clip), data, model)
    assert unclipped.norm().item() > 20 * clip
    # sum of at most |batch| vectors of norm <= C, over the expected batch 32; a Poisson batch of
    # 256 * 1/8 records exceeds 64 with negligible probability
    assert 0 < clipped.norm().item() <= clip * 64 / 32


def test_node_training_adds_noise_by_default(tmp_path, monkeypatch):
    """handle_train on a node: two runs of one job from one model differ (noise from OS entropy)."""
    monkeypatch.delenv("CITYFED_DP_SEED_FROM_JOB", raising=False)
    from citydata import load_department
    from clients.node import handle_train, node_from_config

    pol = tmp_path / "p.toml"
    pol.write_text('department = "health"\nmax_epsilon = 50.0\nmin_noise_multiplier = 0.5\nmax_clipping_norm = 1.0\n'
                   'allowed_tasks = ["heart-disease"]\nmax_rounds_per_run = 5\n')
    spec = node_from_config({"department": "health", "site": "Cleveland", "policy": str(pol),
                             "ledger": str(tmp_path / "l.sqlite")}, {})
    from shared_models import default_model_config

    torch.manual_seed(0)
    state = build_model(default_model_config(load_department("health").schema)).state_dict()
    cfg = {"department": "health", "task": "heart-disease", "run-id": "r", "server-round": 1, "dp": True,
           "noise-multiplier": 1.0, "clipping-norm": 1.0, "batch-size": 32, "seed": 3}
    a, _ = handle_train(state, cfg, spec)
    b, _ = handle_train(state, {**cfg, "server-round": 2}, spec)
    c, _ = handle_train(state, {**cfg, "server-round": 2}, spec)
    assert any(not torch.equal(b[k], c[k]) for k in b)


@pytest.mark.parametrize(
    "cfg,x,y",
    [
        (GRUForecasterConfig(n_features=5, lookback=16, horizon=4), torch.randn(64, 16, 5), torch.randn(64, 4) * 50),
        (PatchTSTForecasterConfig(n_features=5, lookback=32, horizon=4), torch.randn(64, 32, 5), torch.randn(64, 4) * 50),
    ],
    ids=["gru", "patchtst"],
)
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_clipping_bounds_the_update(cfg, x, y, mode):
    """Noise 0, clip C, plain SGD lr: one step moves the weights by at most lr*C."""
    torch.manual_seed(0)
    model = build_model(cfg)
    before = _flat(model).clone()
    from torch.utils.data import DataLoader

    from privacy.dp import make_private
    from shared_models import PerSampleMSE

    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    clip = 0.01
    p = make_private(model, opt, loader, PerSampleMSE(), DPSettings(noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode=mode), epochs=1)
    xb, yb = x, y  # the full batch (Poisson loader would vary its size)
    p.optimizer.zero_grad()
    p.criterion(p.module(xb), yb).backward()
    # Opacus averages clipped per-sample grads over the *expected* batch size
    p.optimizer.expected_batch_size = len(xb)
    p.optimizer.step()
    moved = (_flat(model) - before).norm().item()
    assert 0 < moved <= clip * 1.0001


def test_flower_log_lines_print_once_despite_opacus_basicconfig():
    """Opacus adds a root handler at import; without its removal every Flower line printed twice."""
    import io
    import logging

    from flower_compat.logging import console_handler as flower_console_handler
    from flower_compat.logging import OPACUS_ROOT_FORMAT as _OPACUS_ROOT_FORMAT
    from privacy.dp import route_logs_through_flower

    root = logging.getLogger()
    opacus_like = logging.StreamHandler(io.StringIO())
    opacus_like.setFormatter(logging.Formatter(_OPACUS_ROOT_FORMAT, "%m/%d/%Y %H:%M:%S"))
    other = logging.StreamHandler(io.StringIO())  # someone else's root handler: left alone
    root.addHandler(opacus_like)
    root.addHandler(other)
    try:
        route_logs_through_flower()
        route_logs_through_flower()  # idempotent
        assert opacus_like not in root.handlers
        assert other in root.handlers
        ours = logging.getLogger("cityfed")
        assert ours.handlers.count(flower_console_handler()) == 1 and ours.getEffectiveLevel() == logging.INFO
        logging.getLogger("flwr").info("[ROUND 1/2]")
        assert opacus_like.stream.getvalue() == ""
    finally:
        root.removeHandler(other)
        root.removeHandler(opacus_like)


def test_dp_noise_is_seeded_from_os_entropy_not_from_the_coordinators_job_seed(monkeypatch):
    """The coordinator picks the job seed; noise it could regenerate, it could subtract.

    On a node (the default) two DP runs of the same job from the same weights differ: noise and
    Poisson sampling come from OS entropy. Only with CITYFED_DP_SEED_FROM_JOB=1 (simulations)
    are they reproducible from the job seed; non-private training stays reproducible.
    """
    from privacy.dp import SEED_FROM_JOB_ENV, dp_seed

    data = _data()
    torch.manual_seed(0)
    base = build_model(HeartClassifierConfig(n_features=13))
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-2, seed=7)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)

    def trained(settings):
        m = copy.deepcopy(base)
        fit(m, data, "binary-classification", cfg, settings)
        return _flat(m)

    monkeypatch.delenv(SEED_FROM_JOB_ENV, raising=False)
    assert dp_seed(7) != dp_seed(7)
    assert not torch.equal(trained(dp), trained(dp))
    assert torch.equal(trained(None), trained(None))
    monkeypatch.setenv(SEED_FROM_JOB_ENV, "1")
    assert dp_seed(7) == 7
    assert torch.equal(trained(dp), trained(dp))


def test_fl_client_never_lets_a_node_seed_noise_from_the_job(monkeypatch, tmp_path):
    from clients.cli import NodeLaunch

    monkeypatch.setenv("CITYFED_DP_SEED_FROM_JOB", "1")  # e.g. left over in the operator's shell
    launch = NodeLaunch(coordinator="127.0.0.1:9092", ca=tmp_path / "ca.crt", key=tmp_path / "node.key",
                        home=tmp_path, node_config={})
    assert "CITYFED_DP_SEED_FROM_JOB" not in launch.env()
