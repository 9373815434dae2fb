"""A DP node's record count leaves noised, released once, accounted in its ledger, and reused.

The exact count of a site's records is computed from them: sent as ``num-examples`` (or read
back from DP-SGD's steps, sample rate and delta), it tells apart two data sets that differ in one
record, so no finite epsilon holds for it (independent privacy audit: the default policy sent it
exactly, outside the ledger). :mod:`clients.counts` releases it once through the Gaussian mechanism
(std ``[releases] count_noise_multiplier`` records, default 10) as a ``gaussian-count`` row.
"""

import math
import statistics
import warnings

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.app import REFUSED, app
from clients.counts import released_count
from clients.node import JobRefused, node_from_config
from flower_compat.inprocess import set_task_identity
from privacy import SEED_FROM_JOB_ENV
from privacy.accounting import epsilon
from privacy.ledger import PrivacyLedger

warnings.filterwarnings("ignore", category=UserWarning)

POLICY = """department = "health"
max_epsilon = {max_eps}
min_noise_multiplier = 0.8
max_clipping_norm = 1.0
allowed_tasks = ["heart-disease"]
max_rounds_per_run = 10
"""


def _spec(folder, max_eps=8.0, extra=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.toml").write_text(POLICY.format(max_eps=max_eps) + extra)
    return node_from_config({"department": "health", "site": "Cleveland", "policy": str(folder / "policy.toml"),
                             "ledger": str(folder / "ledger.sqlite"), "audit-log": str(folder / "audit.jsonl")}, {})


def _count(spec, exact=200, split="train"):
    ledger = PrivacyLedger(spec.ledger_path, accountant=spec.policy.accountant)
    return released_count(spec, ledger, split, exact, run_id="r1", round=1), ledger


def test_a_count_is_released_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv(SEED_FROM_JOB_ENV, raising=False)
    spec = _spec(tmp_path)
    first, ledger = _count(spec)
    again, _ = _count(spec)
    assert first == again
    (row,) = ledger.releases("Cleveland")
    assert row["mechanism"] == "gaussian-count" and row["status"] == "committed"
    assert (row["noise_multiplier"], row["sample_rate"], row["steps"]) == (10.0, 1.0, 1)
    # accounted as the Gaussian mechanism at std 10 and sensitivity 1
    assert ledger.epsilon("Cleveland", 1e-5) == pytest.approx(epsilon([(10.0, 1.0, 1)], 1e-5, "rdp"))
    # a data set of another size is another release; the test split is its own
    _count(spec, exact=201)
    _count(spec, split="test")
    assert [r["mechanism"] for r in ledger.releases("Cleveland")] == ["gaussian-count"] * 3


def test_the_released_count_carries_gaussian_noise_of_the_policys_std(tmp_path, monkeypatch):
    """400 fresh ledgers: the values spread with std 10 around the exact count. The sample std of
    400 normal draws is within 25 % of sigma except with probability about 1e-10 (about 7 standard
    errors of the std estimate; rounding to whole records adds 1/12 to the variance)."""
    monkeypatch.delenv(SEED_FROM_JOB_ENV, raising=False)
    values = [_count(_spec(tmp_path / str(i)))[0] for i in range(400)]
    assert 7.5 < statistics.pstdev(values) < 12.5
    assert abs(statistics.fmean(values) - 200) < 5 * 10 / math.sqrt(len(values))
    assert sum(v == 200 for v in values) < 40  # the exact count is not what leaves (about 4 % of draws)


def test_a_count_over_the_budget_is_refused_and_not_stored(tmp_path, monkeypatch):
    monkeypatch.delenv(SEED_FROM_JOB_ENV, raising=False)
    spec = _spec(tmp_path, max_eps=0.1, extra="delta = 1e-5\n")  # one count at std 10 costs more than 0.1
    with pytest.raises(JobRefused, match="record count"):
        _count(spec)
    ledger = PrivacyLedger(spec.ledger_path)
    assert ledger.releases("Cleveland") == [] and ledger.epsilon("Cleveland", 1e-5) == 0.0


def test_simulations_seed_the_count_from_the_job(tmp_path, monkeypatch):
    monkeypatch.setenv(SEED_FROM_JOB_ENV, "1")
    assert _count(_spec(tmp_path / "a"))[0] == _count(_spec(tmp_path / "b"))[0]


def _train(ctx, **over):
    from citydata import load_department
    from shared_models import build_model, default_model_config

    set_task_identity(7, 0, 1)
    torch.manual_seed(0)
    model = build_model(default_model_config(load_department("health").schema))
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": "r1", "server-round": 1,
           "local-epochs": 1, "batch-size": 64, "lr": 0.01, "dp": True, "noise-multiplier": 1.0, "clipping-norm": 1.0,
           **over}
    cfg = {k: v for k, v in cfg.items() if v is not None}  # None: leave the key out
    return app(Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(cfg)}),
                       dst_node_id=1, message_type="train"), ctx)


def _ctx(tmp_path):
    _spec(tmp_path)
    return Context(run_id=7, node_id=1, state=RecordDict(), run_config={},
                   node_config={"department": "health", "site": "Cleveland", "policy": str(tmp_path / "policy.toml"),
                                "ledger": str(tmp_path / "ledger.sqlite"), "audit-log": str(tmp_path / "audit.jsonl")})


def test_the_reply_reports_the_released_count_and_steps_follow_it(tmp_path, monkeypatch):
    monkeypatch.delenv(SEED_FROM_JOB_ENV, raising=False)
    ctx = _ctx(tmp_path)
    reply = _train(ctx)
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    rows = PrivacyLedger(ctx.node_config["ledger"]).releases("Cleveland")
    assert [r["mechanism"] for r in rows] == ["gaussian-count", "dp-sgd"]
    import sqlite3

    with sqlite3.connect(ctx.node_config["ledger"]) as con:
        ((value,),) = con.execute("SELECT value FROM released_counts WHERE split = 'train'").fetchall()
    assert metrics["num-examples"] == value
    assert metrics["steps"] == math.ceil(value / 64)  # one epoch at batch 64 of the released count


@pytest.mark.parametrize("over", [{"noise-multiplier": 0.1}, {"noise-multiplier": None}],
                         ids=["noise-below-minimum", "neither-noise-nor-target"])
def test_a_job_the_policy_refuses_releases_no_count(tmp_path, monkeypatch, over):
    """A DP job with neither a noise multiplier nor a target epsilon released (and spent) the site's count
    before the policy refused it (independent privacy audit, 2026-12-07, L3)."""
    monkeypatch.delenv(SEED_FROM_JOB_ENV, raising=False)
    ctx = _ctx(tmp_path)
    reply = _train(ctx, **over)
    assert reply.has_error() and reply.error.code == REFUSED
    assert "noise_multiplier" in reply.error.reason
    assert PrivacyLedger(ctx.node_config["ledger"]).releases("Cleveland") == []


@pytest.mark.parametrize("over", [{}, {"noise-multiplier": 0.5}, {"dp": False}, {"server-round": 11}],
                         ids=["plain", "low-noise", "dp-off", "round-past-cap"])
def test_an_evaluate_replys_epsilon_follows_the_released_count_whatever_its_settings(tmp_path, monkeypatch, over):
    """Audit finding: an evaluate message with job-like settings the training policy would refuse
    made the node fall back to the exact count for its delta, and the reply's epsilon (computed at
    1/(10 n)) gave the exact training count back."""
    import sys

    from privacy.accounting import rdp_epsilon

    monkeypatch.delenv(SEED_FROM_JOB_ENV, raising=False)
    monkeypatch.setattr(sys.modules["clients.counts"], "_RNG", _Offset(7.0))  # released = exact + 7: deltas differ
    folder = tmp_path / "n"
    _spec(folder, extra='[releases]\nlocal_evaluation = "dp"\n')
    ctx = Context(run_id=7, node_id=1, state=RecordDict(), run_config={},
                  node_config={"department": "health", "site": "Cleveland", "policy": str(folder / "policy.toml"),
                               "ledger": str(folder / "ledger.sqlite")})
    from test_clientapp import _msg

    set_task_identity(7, 0, 1)
    reply = app(_msg(kind="evaluate", **over)[0], ctx)
    assert not reply.has_error(), reply.error
    led = PrivacyLedger(folder / "ledger.sqlite")
    counts = {c["split"]: c for c in led.counts("Cleveland")}
    assert counts["train"]["value"] == counts["train"]["exact"] + 7
    hist = led.history("Cleveland")
    eps = dict(reply.content["metrics"])["epsilon"]
    assert eps == pytest.approx(rdp_epsilon(hist, 1 / (10 * counts["train"]["value"])), rel=1e-9)
    assert eps != pytest.approx(rdp_epsilon(hist, 1 / (10 * counts["train"]["exact"])), rel=1e-6)
    # every row of the site, the test count's included, records the site's one delta (the report reads it)
    assert all(r["delta"] == pytest.approx(1 / (10 * counts["train"]["value"]), rel=1e-12)
               for r in led.releases("Cleveland"))


class _Offset:
    """Stands in for the count noise's generator: every draw is ``offset``."""

    def __init__(self, offset: float):
        self.offset = offset

    def gauss(self, mu, sigma):
        return self.offset


def test_a_count_refused_by_the_budget_says_nothing_computed_from_the_exact_count(tmp_path, monkeypatch):
    """Audit finding: the refusal carried the ledger's message, whose delta was 1/(10 n) of the exact
    count (and the ledger's path); the reason that leaves now names the policy's limit only."""
    monkeypatch.delenv(SEED_FROM_JOB_ENV, raising=False)
    folder = tmp_path / "n"
    _spec(folder, max_eps=0.05)
    ctx = Context(run_id=7, node_id=1, state=RecordDict(), run_config={},
                  node_config={"department": "health", "site": "Cleveland", "policy": str(folder / "policy.toml"),
                               "ledger": str(folder / "ledger.sqlite")})
    reply = _train(ctx)
    assert reply.has_error() and reply.error.code == REFUSED
    reason = reply.error.reason
    assert "record count cannot be released within policy max_epsilon 0.05" in reason
    assert "delta" not in reason and "ledger" not in reason and str(folder) not in reason
    assert PrivacyLedger(folder / "ledger.sqlite").releases("Cleveland") == []


@pytest.mark.parametrize("conflict", [{"department": "traffic"}, {"server-round": 11}, {"clipping-norm": 5.0}])
def test_a_job_refused_outright_computes_nothing_from_the_count(tmp_path, monkeypatch, conflict):
    """Audit finding: a refused job with a tiny target-epsilon was calibrated on the exact count and the
    CalibrationError's 'spend epsilon X' (at delta 1/(10 n)) left in the reason, free of charge."""
    monkeypatch.delenv(SEED_FROM_JOB_ENV, raising=False)
    ctx = _ctx(tmp_path)
    reply = _train(ctx, **{"target-epsilon": 0.0001, "noise-multiplier": None, **conflict})
    assert reply.has_error() and reply.error.code == REFUSED
    assert "epsilon" not in reply.error.reason.replace("max_epsilon", ""), reply.error.reason
    assert PrivacyLedger(ctx.node_config["ledger"]).releases("Cleveland") == []
