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
