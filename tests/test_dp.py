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


def test_noise_is_added():
    """Same seed for sampling, noise on: results differ from the noiseless DP run."""
    data = _data()
    torch.manual_seed(0)
    base = build_model(HeartClassifierConfig(n_features=13, hidden=()))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-2, seed=5)
    fit(a, data, "binary-classification", cfg, DPSettings(noise_multiplier=0.0, max_grad_norm=1.0))
    fit(b, data, "binary-classification", cfg, DPSettings(noise_multiplier=2.0, max_grad_norm=1.0))
    assert (_flat(a) - _flat(b)).norm() > 1e-3


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

    from flwr.supercore.logger import console_handler

    from privacy.dp import _OPACUS_ROOT_FORMAT, route_logs_through_flower

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
        assert ours.handlers.count(console_handler) == 1 and ours.getEffectiveLevel() == logging.INFO
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
