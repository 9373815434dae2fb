"""Epochs chosen on a validation split (clients.selection): the split, the search, and its users
(non-private baselines and non-private personalisation), on the bundled data."""

import math
import os
import warnings

import numpy as np
import pytest
import torch

import clients.selection as sel
from citydata import load_department
from clients.training import TrainConfig
from privacy.dp import DPSettings
from shared_models import build_model, default_model_config

warnings.filterwarnings("ignore")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_forecasting_split_is_the_latest_windows_after_a_one_horizon_gap():
    ds = load_department("utility")
    site = ds.site_data("england-wales-2000")
    data = site.train.tensors()
    n, horizon = len(data), data.tensors[1].shape[1]
    fit_part, val = sel.validation_split(data, "forecasting", 0.2)
    assert len(val) == round(0.2 * n) and len(fit_part) == n - len(val) - horizon
    # the parts are the first and the last windows, in time order
    assert torch.equal(fit_part.tensors[0], data.tensors[0][: len(fit_part)])
    assert torch.equal(val.tensors[1], data.tensors[1][n - len(val):])
    # no fit target step is a validation target step (times of each window's first target step)
    t = site.train.target_time
    step = t[1] - t[0]
    last_fit_target_end = t[len(fit_part) - 1] + (horizon - 1) * step
    assert last_fit_target_end < t[n - len(val)]


def test_classification_split_is_stratified_disjoint_and_seeded():
    ds = load_department("health")
    data = ds.site_data("Switzerland").train.tensors()
    a_fit, a_val = sel.validation_split(data, "binary-classification", 0.25, seed=3)
    b_fit, b_val = sel.validation_split(data, "binary-classification", 0.25, seed=3)
    c_fit, c_val = sel.validation_split(data, "binary-classification", 0.25, seed=4)
    assert torch.equal(a_val.tensors[0], b_val.tensors[0]) and not torch.equal(a_val.tensors[0], c_val.tensors[0])
    assert len(a_fit) + len(a_val) == len(data)
    rows = {tuple(r.tolist()) + (float(y),) for r, y in zip(*data.tensors)}
    fit_rows = {tuple(r.tolist()) + (float(y),) for r, y in zip(*a_fit.tensors)}
    val_rows = {tuple(r.tolist()) + (float(y),) for r, y in zip(*a_val.tensors)}
    assert fit_rows | val_rows == rows and len(val_rows) == len(a_val)  # every record in one part
    y = data.tensors[1].numpy()
    for cls in (0.0, 1.0):  # each class held out in proportion
        assert (a_val.tensors[1].numpy() == cls).sum() == round((y == cls).sum() * 0.25)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_fractions_outside_the_unit_interval(fraction):
    data = load_department("health").site_data("Cleveland").train.tensors()
    with pytest.raises(ValueError, match="fraction"):
        sel.validation_split(data, "binary-classification", fraction)


def test_split_names_too_few_windows():
    data = load_department("utility").site_data("england-wales-2000").train.tensors()
    tiny = torch.utils.data.TensorDataset(data.tensors[0][:20], data.tensors[1][:20])
    with pytest.raises(ValueError, match="20 training windows are too few"):
        sel.validation_split(tiny, "forecasting", 0.2)


def _health():
    ds = load_department("health")
    torch.manual_seed(0)
    return ds, build_model(default_model_config(ds.schema, "heart-mlp"))


def test_search_takes_the_best_epoch_stops_after_patience_and_leaves_the_model(monkeypatch):
    ds, model = _health()
    data = ds.site_data("Cleveland").train.tensors()
    fit_part, val = sel.validation_split(data, "binary-classification")
    scores = iter([5.0, 4.0, 3.0, 3.5, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0] + [9.0] * 50)
    monkeypatch.setattr(sel, "validation_score", lambda *a: next(scores))
    monkeypatch.setattr(sel, "PATIENCE_STEPS", 1)  # patience in epochs only
    before = _state(model)
    best, seen = sel.select_epochs(model, fit_part, val, "binary-classification", TrainConfig(epochs=40, batch_size=32),
                                   patience=3)
    assert best == 5 and seen[1:] == [5.0, 4.0, 3.0, 3.5, 2.5, 2.6, 2.7, 2.8]  # stopped 3 epochs after epoch 5
    assert math.isnan(seen[0])
    assert _same(before, _state(model))


@pytest.mark.parametrize("allow_zero", [False, True])
def test_search_hands_back_the_weights_of_the_count_it_chose(allow_zero):
    """``best`` receives the weights after the chosen count: they score exactly the chosen score on the
    validation part (what choose_kept averages), and the model itself is left as it was."""
    ds, model = _health()
    fit_part, val = sel.validation_split(ds.site_data("Cleveland").train.tensors(), "binary-classification")
    before = _state(model)
    best = {"stale": torch.zeros(1)}
    k, seen = sel.select_epochs(model, fit_part, val, "binary-classification",
                                TrainConfig(epochs=15, batch_size=32, lr=1e-2), allow_zero=allow_zero, best=best)
    assert _same(before, _state(model)) and "stale" not in best
    probe = _health()[1]
    probe.load_state_dict(best)
    assert sel.validation_score(probe, val, "binary-classification") == seen[k]
    assert _same(best, before) == (k == 0)


def test_search_hands_back_the_first_epoch_when_no_score_is_a_number(monkeypatch):
    """Every score NaN (a diverging model): the count is 1 and ``best`` holds the weights after epoch 1."""
    ds, model = _health()
    fit_part, val = sel.validation_split(ds.site_data("Hungary").train.tensors(), "binary-classification")
    after = []
    real = sel.fit

    def spy(m, *a, on_epoch=None, **kw):
        def hook(epoch, loss):
            after.append(_state(m))
            on_epoch(epoch, loss)
        return real(m, *a, on_epoch=hook, **kw)

    monkeypatch.setattr(sel, "fit", spy)
    monkeypatch.setattr(sel, "validation_score", lambda *a: math.nan)
    best = {}
    k, _ = sel.select_epochs(model, fit_part, val, "binary-classification", TrainConfig(epochs=6, batch_size=32), best=best)
    assert k == 1 and len(after) > 1 and _same(best, after[0]) and not _same(best, after[-1])


def test_patience_is_at_least_PATIENCE_STEPS_optimiser_steps(monkeypatch):
    """A small site takes few steps per epoch: the search waits ceil(PATIENCE_STEPS / steps per epoch) epochs."""
    ds, model = _health()
    fit_part, val = sel.validation_split(ds.site_data("Switzerland").train.tensors(), "binary-classification")
    per_epoch = math.ceil(len(fit_part) / 32)
    monkeypatch.setattr(sel, "PATIENCE_STEPS", 4 * per_epoch)
    scores = iter([1.0] + [2.0] * 50)
    monkeypatch.setattr(sel, "validation_score", lambda *a: next(scores))
    best, seen = sel.select_epochs(model, fit_part, val, "binary-classification", TrainConfig(epochs=40, batch_size=32),
                                   patience=1)
    assert best == 1 and len(seen) - 1 == 1 + 4


def test_fit_selected_keeps_the_starting_model_when_no_epoch_beats_it(monkeypatch):
    ds, model = _health()
    data = ds.site_data("Hungary").train.tensors()
    scores = iter([1.0] + [1.0 + i for i in range(1, 100)])  # every epoch worse than the start
    monkeypatch.setattr(sel, "validation_score", lambda *a: next(scores))
    before = _state(model)
    res = sel.fit_selected(model, data, "binary-classification", TrainConfig(epochs=10, batch_size=32), allow_zero=True)
    assert res.selected_epochs == 0 and res.steps == 0 and _same(before, _state(model))


def test_fit_selected_trains_all_records_for_the_chosen_count():
    ds, model = _health()
    site = ds.site_data("Cleveland")
    data = site.train.tensors()
    res = sel.fit_selected(model, data, "binary-classification", TrainConfig(epochs=12, batch_size=32, lr=1e-2))
    k = res.selected_epochs
    scores = res.validation[1:]
    assert 1 <= k <= 12 and scores[k - 1] == min(scores)
    assert res.num_examples == len(data) and res.steps == k * math.ceil(len(data) / 32)
    assert len(res.history) == k


def test_fit_selected_refuses_dp():
    ds, model = _health()
    with pytest.raises(ValueError, match="without DP only"):
        sel.fit_selected(model, ds.site_data("Cleveland").train.tensors(), "binary-classification",
                         TrainConfig(epochs=2), dp=DPSettings(target_epsilon=3.0, max_grad_norm=1.0))


def test_non_private_baselines_train_the_validated_epoch_count_and_dp_ones_the_fixed_count():
    """Defect (issue 12): a fixed, hand-picked epoch count under-trained the local-only baselines
    (utility 6, traffic 4); now the non-private ones choose it on each site's validation split."""
    from simulations.baselines import DEFAULT_TRAIN, SELECT_MAX_EPOCHS, run_baselines

    res = run_baselines("health", epsilons=[3.0], kinds=["heart-mlp"], pooled_dp=False)
    nodp = [r for r in res if r["epsilon"] is None and r["site"] != "pooled"]
    dp = [r for r in res if r["epsilon"] == 3.0 and r["site"] != "pooled"]
    assert len(nodp) == 4 + 4 and len(dp) == 4  # pooled model scored per hospital + 4 local-only; DP: local only
    assert all(1 <= r["metrics"]["epochs"] <= SELECT_MAX_EPOCHS for r in nodp)
    assert all(r["metrics"]["epochs"] == DEFAULT_TRAIN[("health", "heart-mlp")].epochs for r in dp)
    fixed = run_baselines("health", epsilons=[], kinds=["heart-mlp"], epochs=2)
    assert {r["metrics"].get("epochs") for r in fixed if r["site"] != "pooled"} == {2}


def test_non_private_personalisation_keeps_at_most_the_asked_epochs_and_sends_nothing_of_them(tmp_path):
    """The chosen count stays on the node (the kept model's metadata); the reply is the same whitelist."""
    from safetensors import safe_open

    from clients.node import node_from_config
    from clients.personalise import handle_personalise, personalised_path
    from contract.tasks import PERSONALISE_METRICS
    from flower_compat.inprocess import set_task_identity

    set_task_identity(7, 0, 1)
    pol = tmp_path / "policy.toml"
    pol.write_text('department = "health"\nmax_epsilon = 8.0\nmin_noise_multiplier = 0.5\nmax_clipping_norm = 1.0\n'
                   'allowed_tasks = ["heart-disease"]\nmax_rounds_per_run = 10\nrequire_dp = false\npersonalisation = true\n')
    spec = node_from_config({"department": "health", "site": "Cleveland", "policy": str(pol),
                             "ledger": str(tmp_path / "ledger.sqlite")}, {})
    _, model = _health()
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": "r1", "server-round": 3,
           "num-rounds": 3, "local-epochs": 1, "batch-size": 32, "lr": 0.01, "dp": False, "target-epsilon": 3.0,
           "personalise-epochs": 8, "personalise-lr": 0.01, "personalise-layers": "all"}
    reply = handle_personalise(model.state_dict(), cfg, spec)
    assert set(reply) <= set(PERSONALISE_METRICS)
    assert reply["steps"] == 8 * math.ceil(len(spec.site_data()[1].train) / 32)  # the planned steps, not the chosen
    with safe_open(str(personalised_path(spec, "r1")), "pt") as f:
        kept = int(f.metadata()["epochs"])
    assert 0 <= kept <= 8
