"""The per-run round cap binds whatever round numbers the coordinator sends.

``max_rounds_per_run`` compared the job's ``server-round`` with the cap only, so a coordinator
could train one run any number of times by sending round 0, or by repeating a round (audit: with
a cap of 2, run r1 trained 5 times: rounds 0, 0, 0, 2, 2). A training round is numbered from 1,
and the node now counts the run's trainings in its ledger (replays included) against the cap.
"""

import warnings

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.app import REFUSED, app
from flower_compat.inprocess import set_task_identity
from privacy.ledger import PrivacyLedger

warnings.filterwarnings("ignore", category=UserWarning)

POLICY = """department = "health"
max_epsilon = 50.0
min_noise_multiplier = 0.8
max_clipping_norm = 1.0
allowed_tasks = ["heart-disease"]
max_rounds_per_run = 2
require_dp = {require_dp}
"""


def _node(tmp_path, require_dp: bool = True):
    (tmp_path / "policy.toml").write_text(POLICY.format(require_dp=str(require_dp).lower()))
    cfg = {"department": "health", "site": "Cleveland", "policy": str(tmp_path / "policy.toml"),
           "ledger": str(tmp_path / "ledger.sqlite"), "audit-log": str(tmp_path / "audit.jsonl")}
    return Context(run_id=7, node_id=1, node_config=cfg, state=RecordDict(), run_config={})


def _train(ctx, rnd, run="r1", dp=True) -> Message:
    from citydata import load_department
    from shared_models import build_model, default_model_config

    set_task_identity(7, 0, 1)
    torch.manual_seed(0)
    model = build_model(default_model_config(load_department("health").schema))
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": run, "server-round": rnd,
           "local-epochs": 1, "batch-size": 64, "lr": 0.01, "dp": dp, "noise-multiplier": 1.0, "clipping-norm": 1.0}
    return app(Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(cfg)}),
                       dst_node_id=1, message_type="train"), ctx)


def _trained(ctx, run="r1") -> list[int]:
    rows = PrivacyLedger(ctx.node_config["ledger"]).releases("Cleveland")
    return [r["round"] for r in rows if r["run_id"] == run and r["status"] != "aborted"
            and r["mechanism"] in ("dp-sgd", "non-private")]


def test_round_zero_is_refused_for_training(tmp_path):
    ctx = _node(tmp_path)
    reply = _train(ctx, 0)
    assert reply.has_error() and reply.error.code == REFUSED and "server-round 0" in reply.error.reason
    assert _trained(ctx) == []


def test_repeating_a_round_counts_against_the_cap(tmp_path):
    ctx = _node(tmp_path)
    for rnd in (1, 2):
        assert not _train(ctx, rnd).has_error()
    reply = _train(ctx, 2)  # a replay: the run already trained max_rounds_per_run times
    assert reply.has_error() and reply.error.code == REFUSED
    assert "max_rounds_per_run" in reply.error.reason and "r1" in reply.error.reason
    assert _trained(ctx) == [1, 2]


def test_a_replay_within_the_cap_is_trained(tmp_path):
    ctx = _node(tmp_path)
    assert not _train(ctx, 1).has_error()
    assert not _train(ctx, 1).has_error()  # a resumed run replays round 1: still within 2 trainings
    assert _train(ctx, 2).has_error()  # the third training of the run
    assert _trained(ctx) == [1, 1]


def test_the_cap_is_per_run_and_counts_non_private_rounds(tmp_path):
    ctx = _node(tmp_path, require_dp=False)
    for rnd in (1, 1):
        assert not _train(ctx, rnd, dp=False).has_error()
    assert _train(ctx, 2, dp=False).has_error()
    assert not _train(ctx, 1, run="r2", dp=False).has_error()
    assert _trained(ctx, "r2") == [1]


# -- two processes of one node: the caps are checked inside the ledger's write transaction --------
#
# Each cap was read (PrivacyLedger.count) before, and outside, the transaction that records the
# release, so two processes of one node (two fl-client runs on one ledger, or two simulation
# workers) could both read "1 of 2 done" and both train. The tests below make every early read
# stale, as the slower process sees it, and check that the ledger's write refuses the release.

EVAL_POLICY = POLICY + '\n[releases]\nlocal_evaluation = "dp"\nmax_evaluations_per_run = 2\n'


def _stale_reads(monkeypatch):
    """Every PrivacyLedger.count read sees no release yet (another process's rows land after it)."""
    monkeypatch.setattr(PrivacyLedger, "count", lambda self, site, run_id, mechanism: 0)


def test_a_stale_read_of_the_training_cap_cannot_train_past_it(tmp_path, monkeypatch):
    ctx = _node(tmp_path)
    _stale_reads(monkeypatch)
    for rnd in (1, 1):  # round 1 and its replay: the run's 2 trainings
        assert not _train(ctx, rnd).has_error()
    reply = _train(ctx, 2)  # within the policy's round numbers, past its count of trainings
    assert reply.has_error() and reply.error.code == REFUSED
    assert "max_rounds_per_run" in reply.error.reason and "r1" in reply.error.reason
    assert _trained(ctx) == [1, 1]
    rows = PrivacyLedger(ctx.node_config["ledger"]).releases("Cleveland")
    assert not [r for r in rows if r["round"] == 2 and r["status"] != "aborted"]  # nothing counted for round 2


def test_a_stale_read_of_the_training_cap_cannot_train_past_it_without_dp(tmp_path, monkeypatch):
    ctx = _node(tmp_path, require_dp=False)
    _stale_reads(monkeypatch)
    for rnd in (1, 1):
        assert not _train(ctx, rnd, dp=False).has_error()
    reply = _train(ctx, 2, dp=False)
    assert reply.has_error() and "max_rounds_per_run" in reply.error.reason
    assert _trained(ctx) == [1, 1]


def _evaluate(ctx, rnd, run="r1") -> Message:
    from citydata import load_department
    from shared_models import build_model, default_model_config

    set_task_identity(7, 0, 1)
    model = build_model(default_model_config(load_department("health").schema))
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": run, "server-round": rnd}
    return app(Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(cfg)}),
                       dst_node_id=1, message_type="evaluate"), ctx)


def test_a_stale_read_of_the_evaluation_cap_cannot_evaluate_past_it(tmp_path, monkeypatch):
    ctx = _node(tmp_path)
    (tmp_path / "policy.toml").write_text(EVAL_POLICY.format(require_dp="true"))
    _stale_reads(monkeypatch)
    for rnd in (1, 2):
        assert not _evaluate(ctx, rnd).has_error()
    reply = _evaluate(ctx, 3)
    assert reply.has_error() and reply.error.code == REFUSED
    assert "max_evaluations_per_run" in reply.error.reason
    rows = PrivacyLedger(ctx.node_config["ledger"]).releases("Cleveland")
    assert [r["round"] for r in rows if r["mechanism"] == "gaussian-eval" and r["status"] != "aborted"] == [1, 2]


def test_a_stale_read_cannot_personalise_a_run_twice(tmp_path, monkeypatch):
    from clients.node import JobRefused, node_from_config
    from clients.personalise import handle_personalise
    from citydata import load_department
    from shared_models import build_model, default_model_config

    ctx = _node(tmp_path)
    (tmp_path / "policy.toml").write_text(POLICY.format(require_dp="true") + "personalisation = true\n")
    spec = node_from_config(dict(ctx.node_config), {})
    set_task_identity(7, 0, 1)
    state = build_model(default_model_config(load_department("health").schema)).state_dict()
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": "r1", "server-round": 1,
           "num-rounds": 1, "local-epochs": 1, "batch-size": 64, "lr": 0.01, "dp": True, "target-epsilon": 3.0,
           "clipping-norm": 1.0, "seed": 0, "personalise-epochs": 1, "personalise-layers": "head"}
    _stale_reads(monkeypatch)
    handle_personalise(state, cfg, spec)
    try:
        handle_personalise(state, cfg, spec)
    except JobRefused as exc:
        assert "once per run" in str(exc)
    else:
        raise AssertionError("a second personalisation of run r1 was trained")
    rows = PrivacyLedger(ctx.node_config["ledger"]).releases("Cleveland")
    assert len([r for r in rows if r["mechanism"] == "personalisation" and r["status"] != "aborted"]) == 1


def test_the_ledger_refuses_a_release_past_a_run_cap_atomically(tmp_path):
    from privacy.ledger import Release, RunCapExceededError

    ledger = PrivacyLedger(tmp_path / "l.sqlite")

    def rel(rnd, run="r1"):
        return Release(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5, run_id=run, round=rnd,
                       site="s", department="health")

    cap = (("dp-sgd", "non-private"), 2)
    ledger.abort(ledger.begin(rel(1), run_cap=cap), "failed")  # aborted rows do not count
    ledger.begin(rel(1), run_cap=cap)
    ledger.commit(ledger.begin(rel(2), run_cap=cap))
    try:
        ledger.begin(rel(3), run_cap=cap)
    except RunCapExceededError as exc:
        assert exc.done == 2 and exc.cap == 2 and "r1" in str(exc)
    else:
        raise AssertionError("a third release of run r1 was recorded")
    ledger.begin(rel(1, run="r2"), run_cap=cap)  # another run has its own cap
    assert [(r["run_id"], r["round"], r["status"]) for r in ledger.releases("s")] == [
        ("r1", 1, "aborted"), ("r1", 1, "pending"), ("r1", 2, "committed"), ("r2", 1, "pending")]
