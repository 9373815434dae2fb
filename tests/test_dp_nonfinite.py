"""A record whose gradient is not finite contributes zero: it cannot turn the noised update into NaN.

Opacus clips a record's gradient by ``C / (norm + 1e-6)``; an infinite norm gives 0 and ``0 * inf``
is NaN, so before the fix one such record made the whole update NaN, whatever the noise. The
coordinator chooses the weights: with a hidden unit ``relu(x_k * FLT_MAX / t)`` exactly the records
with ``x_k > t`` overflow, and "the update is NaN" answered, without noise and without a ledger
row, whether a sampled record lies above ``t`` (an independent audit found ``max x_k`` to 3
decimals in 12 messages while the node reported epsilon 2.4).
"""

import math
import warnings

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch.utils.data import TensorDataset

from citydata import load_department
from clients.app import app
from clients.training import TrainConfig, fit
from flower_compat.inprocess import set_task_identity
from privacy.dp import DPSettings
from privacy.ledger import PrivacyLedger
from shared_models import build_model, default_model_config

warnings.filterwarnings("ignore", category=UserWarning)

FLT_MAX = float(np.finfo(np.float32).max)
FEATURE = 2


def _cleveland():
    ds = load_department("health")
    return ds, ds.site_data("Cleveland").train.tensors()


def _probe(ds, threshold: float) -> torch.nn.Module:
    """The crafted model: logit = relu(x_FEATURE * FLT_MAX / threshold), every other weight 0."""
    model = build_model(default_model_config(ds.schema))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.net[0].weight[0, FEATURE] = FLT_MAX / threshold
        model.net[2].weight[0, 0] = 1.0
    return model


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_a_non_finite_record_counts_as_zero(mode):
    ds, data = _cleveland()
    x, y = data.tensors
    n = len(x)
    bad_x = x.clone()
    bad_x[0] = math.inf  # one record whose gradient is not finite

    def update(xs, ys):
        torch.manual_seed(0)
        model = build_model(default_model_config(ds.schema))
        before = [p.detach().clone() for p in model.parameters()]
        # q = 1 (one batch of every record) and no noise: the update is a function of the records alone
        dp = DPSettings(noise_multiplier=0.0, max_grad_norm=1.0, delta=1e-5, grad_sample_mode=mode, public_records=n)
        fit(model, TensorDataset(xs, ys), ds.schema.task, TrainConfig(epochs=1, batch_size=n, lr=0.1, optimizer="sgd"), dp)
        return [(p.detach() - b) for p, b in zip(model.parameters(), before)]

    with_bad = update(bad_x, y)
    without = update(x[1:], y[1:])  # the same public count: the same divisor
    assert all(torch.isfinite(u).all() for u in with_bad)
    for a, b in zip(with_bad, without):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_a_coordinators_threshold_probe_learns_nothing_from_nan(tmp_path):
    """The audit's attack through the real ClientApp: the reply is finite whether or not a record is above t."""
    set_task_identity(7, 0, 1)
    ds, data = _cleveland()
    top = float(data.tensors[0][:, FEATURE].max())
    pol = tmp_path / "policy.toml"
    pol.write_text('department = "health"\nmax_epsilon = 8.0\nmin_noise_multiplier = 0.8\nmax_clipping_norm = 1.0\n'
                   'allowed_tasks = ["heart-disease"]\nmax_rounds_per_run = 10\nrequire_dp = true\n')
    ctx = Context(run_id=7, node_id=1, node_config={"department": "health", "site": "Cleveland", "policy": str(pol),
                                                     "ledger": str(tmp_path / "ledger.sqlite")},
                  state=RecordDict(), run_config={})
    for i, threshold in enumerate((top * 0.5, top * 2.0)):  # some records above it, then none
        cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": f"probe-{i}",
               "server-round": 1, "local-epochs": 1, "batch-size": 1000, "lr": 0.01, "dp": True,
               "noise-multiplier": 1.0, "clipping-norm": 1.0}
        msg = Message(RecordDict({"arrays": ArrayRecord(_probe(ds, threshold).state_dict()), "config": ConfigRecord(cfg)}),
                      dst_node_id=1, message_type="train")
        reply = app(msg, ctx)
        assert not reply.has_error(), reply.error.reason
        state = reply.content["arrays"].to_torch_state_dict()
        assert all(torch.isfinite(v).all() for v in state.values()), f"threshold {threshold}: a non-finite update left"
    # both probes accounted; count release: the site's count was released (once, by the first probe's run) before them
    rows = PrivacyLedger(tmp_path / "ledger.sqlite").releases("Cleveland")
    assert [(r["mechanism"], r["run_id"]) for r in rows] == [
        ("gaussian-count", "probe-0"), ("dp-sgd", "probe-0"), ("dp-sgd", "probe-1")]
