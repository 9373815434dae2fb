"""A round trained without DP is a release: the node's ledger records it and its epsilon is infinite after it.

A policy may allow non-DP jobs (``require_dp = false``: a trial run, or central DP where the
coordinator adds the noise). The update that leaves is still computed from the node's records.
Before, nothing was written to the ledger: a later DP round reported a finite lifetime epsilon
(3.45) for a site whose unnoised model had already left (independent privacy audit).
"""

import json
import math
import warnings

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.app import REFUSED, app
from flower_compat.inprocess import set_task_identity
from privacy.accounting import epsilon
from privacy.ledger import PrivacyLedger

warnings.filterwarnings("ignore", category=UserWarning)

POLICY = """department = "health"
max_epsilon = 8.0
min_noise_multiplier = 0.8
max_clipping_norm = 1.0
allowed_tasks = ["heart-disease"]
max_rounds_per_run = 5
require_dp = false
"""


def _node(tmp_path):
    (tmp_path / "policy.toml").write_text(POLICY)
    cfg = {"department": "health", "site": "Cleveland", "policy": str(tmp_path / "policy.toml"),
           "ledger": str(tmp_path / "ledger.sqlite"), "audit-log": str(tmp_path / "audit.jsonl")}
    return Context(run_id=7, node_id=1, node_config=cfg, state=RecordDict(), run_config={})


def _train(ctx, rnd: int, dp: bool, run: str = "r1") -> Message:
    from citydata import load_department
    from shared_models import build_model, default_model_config

    set_task_identity(7, 0, 1)
    torch.manual_seed(0)
    model = build_model(default_model_config(load_department("health").schema))
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": run, "server-round": rnd,
           "local-epochs": 1, "batch-size": 64, "lr": 0.01, "dp": dp, "noise-multiplier": 1.0, "clipping-norm": 1.0}
    msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(cfg)}),
                  dst_node_id=1, message_type="train")
    return app(msg, ctx)


def _audit(ctx) -> list[dict]:
    with open(ctx.node_config["audit-log"]) as fh:
        return [json.loads(line) for line in fh]


def test_a_non_dp_round_is_recorded_and_makes_the_sites_epsilon_infinite(tmp_path):
    ctx = _node(tmp_path)
    reply = _train(ctx, 1, dp=False)
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    assert metrics["noise-multiplier"] == 0.0  # no noise was added: the reply said 1.0
    assert math.isinf(metrics["epsilon"])
    ledger = PrivacyLedger(ctx.node_config["ledger"])
    (row,) = ledger.releases("Cleveland")
    assert row["mechanism"] == "non-private" and row["status"] == "committed" and row["noise_multiplier"] == 0.0
    assert row["run_id"] == "r1" and row["round"] == 1
    assert math.isinf(ledger.epsilon("Cleveland", 1e-5))
    (entry,) = [e["data"] for e in _audit(ctx) if e["kind"] == "release"]
    assert entry["mechanism"] == "non-private" and math.isinf(float(entry["epsilon_after"]))  # JSON: "inf"


def test_a_dp_round_after_a_non_dp_round_reports_no_finite_epsilon(tmp_path):
    ctx = _node(tmp_path)
    assert not _train(ctx, 1, dp=False).has_error()
    reply = _train(ctx, 2, dp=True)
    # no finite lifetime epsilon can be claimed: the budget check refuses the DP job and says why
    assert reply.has_error() and reply.error.code == REFUSED
    assert "non-private" in reply.error.reason and "require_dp" in reply.error.reason
    rows = PrivacyLedger(ctx.node_config["ledger"]).releases("Cleveland")
    assert [r["mechanism"] for r in rows] == ["non-private"]


def test_a_dp_round_before_any_non_dp_round_keeps_its_finite_epsilon(tmp_path):
    ctx = _node(tmp_path)
    reply = _train(ctx, 1, dp=True)
    assert not reply.has_error(), reply.error
    assert 0 < dict(reply.content["metrics"])["epsilon"] < 8.0


def test_a_non_dp_round_that_fails_before_anything_left_is_not_counted(tmp_path, monkeypatch):
    import clients.node as cnode

    ctx = _node(tmp_path)

    def broken(*a, **k):
        raise RuntimeError("training failed")

    monkeypatch.setattr(cnode, "fit", broken)
    reply = _train(ctx, 1, dp=False)
    assert reply.has_error()
    ledger = PrivacyLedger(ctx.node_config["ledger"])
    (row,) = ledger.releases("Cleveland")
    assert row["mechanism"] == "non-private" and row["status"] == "aborted"
    assert ledger.epsilon("Cleveland", 1e-5) == 0.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_noiseless_release_composes_to_infinity_without_a_warning(accountant):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isinf(epsilon([(1.0, 0.1, 10), (0.0, 1.0, 1)], 1e-5, accountant))
    assert math.isfinite(epsilon([(1.0, 0.1, 10)], 1e-5, accountant))
