"""Short real training runs per department: each beats its trivial baseline."""

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from citydata import load_department
from clients.training import TrainConfig, fit
from shared_models.scoring import evaluate, predict, roc_auc
from privacy.dp import DPSettings
from shared_models import build_model, default_model_config

warnings.filterwarnings("ignore", category=UserWarning)


def _pooled_train(ds, sites):
    parts = [ds.site_data(s).train.tensors() for s in sites]
    return TensorDataset(*(torch.cat([p.tensors[i] for p in parts]) for i in range(2)))


def test_roc_auc_matches_definition():
    y = np.array([0, 0, 1, 1, 1, 0])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.2])
    pairs = [(p, n) for p in s[y == 1] for n in s[y == 0]]
    assert roc_auc(y, s) == pytest.approx(np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs]))


@pytest.mark.parametrize("dp", [None, DPSettings(target_epsilon=8.0)], ids=["no-dp", "dp-eps8"])
def test_health_beats_majority_class(dp):
    ds = load_department("health")
    torch.manual_seed(0)
    model = build_model(default_model_config(ds.schema))
    fit(model, _pooled_train(ds, ds.sites), ds.schema.task, TrainConfig(epochs=20, batch_size=32, lr=1e-2), dp)
    y = np.concatenate([ds.site_data(s).test.y for s in ds.sites])
    logits = np.concatenate([predict(model, ds.site_data(s).test.X) for s in ds.sites])
    majority = max(y.mean(), 1 - y.mean())
    acc = ((logits > 0) == y).mean()
    assert acc > majority + 0.05, (acc, majority)
    assert roc_auc(y, logits) > 0.75


@pytest.mark.parametrize("kind", ["gru", "patchtst"])
def test_traffic_beats_naive(kind):
    ds = load_department("traffic")
    sites = ds.sites[:3]
    torch.manual_seed(0)
    model = build_model(default_model_config(ds.schema, kind))
    fit(model, _pooled_train(ds, sites), ds.schema.task, TrainConfig(epochs=2, batch_size=128, lr=3e-3))
    ratios = [evaluate(model, ds.site_data(s), ds.schema.task)["mae_ratio"] for s in sites]
    assert np.mean(ratios) < 1.0, ratios


def test_utility_beats_naive():
    ds = load_department("utility")
    site = "england-wales-2000"
    torch.manual_seed(0)
    model = build_model(default_model_config(ds.schema, "gru"))
    fit(model, ds.site_data(site).train.tensors(), ds.schema.task, TrainConfig(epochs=6, batch_size=64, lr=3e-3))
    m = evaluate(model, ds.site_data(site), ds.schema.task)
    assert m["mae"] < m["mae_naive_best"], m
