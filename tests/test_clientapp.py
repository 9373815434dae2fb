"""The department ClientApp called in-process: policy, ledger, and what leaves the node."""

import math
import warnings

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant

from clients.app import REFUSED, app
from contract.tasks import EVAL_METRICS, TRAIN_METRICS
from flower_compat.inprocess import set_task_identity
from privacy.ledger import PrivacyLedger
from shared_models import build_model, default_model_config
from citydata import load_department

warnings.filterwarnings("ignore", category=UserWarning)

POLICY = """
department = "health"
max_epsilon = {max_eps}
delta = 1e-3
min_noise_multiplier = 0.8
max_clipping_norm = 1.0
allowed_tasks = ["heart-disease"]
max_rounds_per_run = 10
require_dp = true
{releases}
"""
#: Cleveland's training records in the bundled data (seed 0's per-record hash split), and its delta:
#: 1/(10 n) < the policy's 1e-3 ceiling.
N_TRAIN = len(load_department("health").site_data("Cleveland").train)
DELTA = 1 / (10 * N_TRAIN)


@pytest.fixture(autouse=True)
def _identity():
    set_task_identity(7, 0, 1)
    yield


def _node(tmp_path, max_eps=8.0, site="Cleveland", releases=""):
    pol = tmp_path / "policy.toml"
    pol.write_text(POLICY.format(max_eps=max_eps, releases=f"[releases]\n{releases}" if releases else ""))
    ledger = tmp_path / "ledger.sqlite"
    ctx = Context(run_id=7, node_id=1, node_config={"department": "health", "site": site, "policy": str(pol),
                                                     "ledger": str(ledger)}, state=RecordDict(), run_config={})
    return ctx, ledger


def _released(ledger, split="train"):
    """The site's released (noised, accounted once) record count of ``split``: what its replies derive from."""
    rows = PrivacyLedger(ledger).counts("Cleveland", split=split)
    assert len(rows) == 1, rows  # released once, then reused
    return rows[0]["value"]


def _site_delta(n):
    """The policy's delta for a site whose (released, rounded) count gives ``n`` records: min(1/(10 n), 1e-3)."""
    return min(1 / (10 * n), 1e-3)


def _msg(kind="train", rnd=1, **over):
    torch.manual_seed(0)
    model = build_model(default_model_config(load_department("health").schema))
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": "r1", "server-round": rnd,
           "local-epochs": 1, "batch-size": 32, "lr": 0.01, "dp": True, "noise-multiplier": 1.0, "clipping-norm": 1.0}
    cfg.update(over)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(cfg)})
    return Message(content=content, dst_node_id=1, message_type=kind), model


def test_train_reply_has_only_model_arrays_and_whitelisted_metrics(tmp_path):
    ctx, ledger = _node(tmp_path)
    msg, model = _msg()
    reply = app(msg, ctx)
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    state = reply.content["arrays"].to_torch_state_dict()
    ref = model.state_dict()
    assert state.keys() == ref.keys()
    assert all(state[k].shape == ref[k].shape and state[k].dtype == ref[k].dtype for k in ref)
    assert any(not torch.equal(state[k], ref[k]) for k in ref)  # it trained
    metrics = dict(reply.content["metrics"])
    assert set(metrics) <= set(TRAIN_METRICS)
    # defaults: no training loss leaves; the record count leaves noised (std 10), released once and accounted
    assert "train-loss" not in metrics and abs(metrics["num-examples"] - N_TRAIN) <= 60
    rows = PrivacyLedger(ledger).releases()
    assert [r["mechanism"] for r in rows] == ["gaussian-count", "dp-sgd"]
    assert rows[0]["noise_multiplier"] == 10.0 and rows[0]["status"] == "committed"
    again = dict(app(_msg(rnd=2)[0], ctx).content["metrics"])  # the next round reuses the released value
    assert again["num-examples"] == metrics["num-examples"]
    assert [r["mechanism"] for r in PrivacyLedger(ledger).releases()] == ["gaussian-count", "dp-sgd", "dp-sgd"]
    # the count that leaves is the released one (granularity 1), and DP-SGD's steps derive from it
    n = _released(ledger)
    assert metrics["num-examples"] == n and metrics["steps"] == math.ceil(n / 32)
    # epsilon in the reply = ledger = an independent accountant for the recorded releases, at the site's delta
    # (count release: the delta and sample rate follow the released count, and the count's release is composed in)
    delta = _site_delta(n)
    rel = [r for r in PrivacyLedger(ledger).releases("Cleveland") if r["mechanism"] == "dp-sgd"]
    assert [r["round"] for r in rel] == [1, 2] and rel[0]["delta"] == pytest.approx(delta)
    acc = RDPAccountant()
    acc.step(noise_multiplier=10.0, sample_rate=1.0)  # the count's Gaussian release (q = 1, one step) comes first
    for _ in range(metrics["steps"]):
        acc.step(noise_multiplier=1.0, sample_rate=1 / math.ceil(n / 32))
    assert metrics["epsilon"] == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-9)


def test_train_loss_leaves_only_as_an_accounted_dp_release(tmp_path):
    ctx, ledger = _node(tmp_path, releases='train_loss = "dp"\nmetric_noise_multiplier = 4.0\nnum_examples_granularity = 10')
    reply = app(_msg()[0], ctx)
    metrics = dict(reply.content["metrics"])
    # count release: the released (noised) count of the N_TRAIN records, rounded by policy to a multiple of 10
    n = _released(ledger)
    public = max(10, round(n / 10) * 10)
    assert metrics["num-examples"] == public and 0.0 <= metrics["train-loss"] <= 2.0
    rel = PrivacyLedger(ledger).releases("Cleveland")
    assert [(r["mechanism"], r["noise_multiplier"], r["sample_rate"], r["steps"], r["status"]) for r in rel] == [
        ("gaussian-count", 10.0, 1.0, 1, "committed"),  # count release: the count is released (once) first
        ("dp-sgd", 1.0, 1 / math.ceil(public / 32), metrics["steps"], "committed"),
        ("gaussian-train-loss", 4.0, 1.0, 1, "committed")]
    assert metrics["steps"] == math.ceil(public / 32)
    acc = RDPAccountant()  # the Gaussian mechanism is the sampled Gaussian at q = 1
    acc.step(noise_multiplier=10.0, sample_rate=1.0)
    for _ in range(metrics["steps"]):
        acc.step(noise_multiplier=1.0, sample_rate=1 / math.ceil(public / 32))
    acc.step(noise_multiplier=4.0, sample_rate=1.0)
    # counts rounded to 10: the delta is that of the rounded released count + 10 // 2 records
    # (clients.node.delta_records), not of the exact N_TRAIN
    assert rel[1]["delta"] == pytest.approx(_site_delta(public + 5))
    assert metrics["epsilon"] == pytest.approx(acc.get_epsilon(delta=_site_delta(public + 5)), rel=1e-9)


def test_evaluation_on_private_records_is_refused_by_default(tmp_path):
    ctx, ledger = _node(tmp_path)
    reply = app(_msg(kind="evaluate")[0], ctx)
    assert reply.has_error() and reply.error.code == REFUSED and "local_evaluation" in reply.error.reason
    assert PrivacyLedger(ledger).releases() == []


def test_evaluate_flood_is_capped_noised_and_accounted(tmp_path):
    """A coordinator sends many crafted models to read the node's test split: the policy caps and noises it."""
    from clients.node import handle_evaluate, node_from_config
    from shared_models.scoring import evaluate as exact_evaluate

    ctx, ledger = _node(tmp_path, releases='local_evaluation = "dp"\nmax_evaluations_per_run = 3')
    spec = node_from_config(dict(ctx.node_config), {})
    ds = load_department("health")
    answered, refused, exact, released = 0, 0, [], []
    for k in range(8):
        torch.manual_seed(100 + k)  # a different crafted model each time
        msg, model = _msg(kind="evaluate")
        msg.content["arrays"] = ArrayRecord(build_model(default_model_config(ds.schema)).state_dict())
        reply = app(msg, ctx)
        if reply.has_error():
            refused += 1
            assert reply.error.code == REFUSED and "max_evaluations_per_run" in reply.error.reason
            continue
        answered += 1
        m = dict(reply.content["metrics"])
        assert set(m) <= set(EVAL_METRICS) and set(m) >= {"accuracy", "loss", "epsilon", "num-examples"}
        state = msg.content["arrays"].to_torch_state_dict()
        model.load_state_dict(state)
        exact.append(exact_evaluate(model, ds.site_data("Cleveland"), ds.schema.task)["accuracy"])
        released.append(m["accuracy"])
    assert (answered, refused) == (3, 5)
    assert all(abs(a - b) > 1e-6 for a, b in zip(exact, released))  # noised, never the exact value
    rel = PrivacyLedger(ledger).releases("Cleveland")
    # count release: the first evaluation releases the training and the test counts (once each, noise std 10)
    assert [(r["mechanism"], r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in rel] == [
        ("gaussian-count", 10.0, 1.0, 1)] * 2 + [("gaussian-eval", spec.policy.releases.metric_noise_multiplier, 1.0, 2)] * 3
    assert [c["split"] for c in PrivacyLedger(ledger).counts("Cleveland")] == ["train", "test"]
    assert m["num-examples"] == _released(ledger, "test")  # the released test count, not the exact one
    acc = RDPAccountant()
    for _ in range(2):
        acc.step(noise_multiplier=10.0, sample_rate=1.0)
    for _ in range(3 * 2):
        acc.step(noise_multiplier=spec.policy.releases.metric_noise_multiplier, sample_rate=1.0)
    # the site's delta follows the released training count
    assert m["epsilon"] == pytest.approx(acc.get_epsilon(delta=_site_delta(_released(ledger))), rel=1e-9)
    # another run gets its own cap, still within the node's lifetime budget
    assert "accuracy" in handle_evaluate(state, {**dict(msg.content["config"]), "run-id": "r2"}, spec)


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"noise-multiplier": 0.5}, "min_noise_multiplier"),
        ({"clipping-norm": 5.0}, "max_clipping_norm"),
        ({"dp": False}, "require_dp"),
        ({"department": "traffic"}, "department"),
        ({"server-round": 11}, "max_rounds_per_run"),
    ],
)
def test_weaker_job_is_refused_and_nothing_recorded(tmp_path, over, needle):
    ctx, ledger = _node(tmp_path)
    msg, _ = _msg(**over)
    reply = app(msg, ctx)
    assert reply.has_error() and reply.error.code == REFUSED
    assert needle in reply.error.reason
    assert PrivacyLedger(ledger).releases("Cleveland") == []


def test_budget_refusal_after_spending(tmp_path):
    ctx, ledger = _node(tmp_path, max_eps=3.0)
    first = app(_msg(rnd=1)[0], ctx)
    assert not first.has_error()
    eps1 = dict(first.content["metrics"])["epsilon"]
    assert 0 < eps1 < 3.0
    second = app(_msg(rnd=2)[0], ctx)
    assert second.has_error() and second.error.code == REFUSED and "max_epsilon" in second.error.reason
    # the ledger kept the first round's releases only (count release: the count, then DP-SGD), and survives a reopen
    assert [r["mechanism"] for r in PrivacyLedger(ledger).releases("Cleveland")] == ["gaussian-count", "dp-sgd"]
    assert PrivacyLedger(ledger).epsilon("Cleveland", _site_delta(_released(ledger))) == pytest.approx(eps1)


def test_coordinators_run_config_cannot_move_a_node_to_a_fresh_budget(tmp_path):
    """Node-side keys in the run config (virtual-sites, partition-id, ledger-dir, dropout) are ignored.

    Were they honoured on a department node, a coordinator could have the node train on a
    share of its records as site "virtual-3", whose ledger entry is empty: a fresh budget.
    """
    from clients.node import node_from_config

    ctx, ledger = _node(tmp_path)
    hostile = {"virtual-sites": 5, "partition-id": 3, "partitioner": "iid", "ledger-dir": str(tmp_path / "other"),
               "dropout-probability": 1.0, "site": "Hungary", "data": str(tmp_path / "nothing.csv")}
    spec = node_from_config(dict(ctx.node_config), hostile)
    assert (spec.site, spec.virtual, spec.dropout_probability, spec.data) == ("Cleveland", None, 0.0, None)
    assert spec.ledger_path == ledger
    # end to end: the release lands on the node's own site in its own ledger
    ctx.run_config = hostile
    msg, _ = _msg()
    reply = app(msg, ctx)
    assert not reply.has_error()
    # count release: the node's count is released on its own site, in its own ledger, before the round
    assert [(r["mechanism"], r["round"]) for r in PrivacyLedger(ledger).releases()] == [
        ("gaussian-count", 1), ("dp-sgd", 1)]
    assert [(c["site"], c["split"]) for c in PrivacyLedger(ledger).counts()] == [("Cleveland", "train")]
    assert not (tmp_path / "other").exists()


def test_node_audit_log_records_job_release_and_what_left(tmp_path):
    """fl-client configures an audit log signed with the node key: every decision and release is in it."""
    import json

    from privacy import pki
    from privacy.audit import verify

    key, pub, _ = pki.create_node_key(tmp_path / "keys", "health", "Cleveland")
    ctx, ledger = _node(tmp_path)
    ctx.node_config = {**dict(ctx.node_config), "audit-log": str(tmp_path / "audit.jsonl"), "audit-key": str(key)}
    assert not app(_msg()[0], ctx).has_error()
    assert app(_msg(kind="evaluate")[0], ctx).has_error()  # evaluation off: refused, and recorded
    weak = app(_msg(rnd=2, **{"noise-multiplier": 0.5})[0], ctx)
    assert weak.has_error()
    res = verify(tmp_path / "audit.jsonl", public_key_path=pub)
    assert res.ok, res.reason
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    kinds = [e["kind"] for e in entries]
    # count release: the training count's release is audited first, before the job it was released for
    # the weak job is refused before anything is computed from the count: a job-refused entry
    assert kinds == ["release", "job", "release", "reply", "evaluate", "reply", "job-refused", "reply"]
    count = entries[0]["data"]
    assert count["mechanism"] == "gaussian-count" and count["split"] == "train" and count["noise_multiplier"] == 10.0
    assert count["run"] == "r1" and count["round"] == 1 and count["epsilon_after"] > count["epsilon_before"] == 0
    job, release, reply = (e["data"] for e in entries[1:4])
    assert job["decision"] == "accepted" and job["run"] == "r1" and job["config"]["noise-multiplier"] == 1.0
    assert release["mechanism"] == "dp-sgd" and release["epsilon_after"] > release["epsilon_before"] > 0
    assert {a["name"] for a in reply["arrays"]} == set(_msg()[1].state_dict()) and all(a["bytes"] > 0 for a in reply["arrays"])
    # no energy figure: the policy does not opt in ([releases] energy, default "off")
    assert reply["metrics"] == sorted(["num-examples", "epsilon", "noise-multiplier", "steps"])
    assert entries[4]["data"]["decision"] == "refused" and "local_evaluation" in entries[4]["data"]["reason"]
    assert "min_noise_multiplier" in entries[6]["data"]["reason"] and entries[6]["data"]["round"] == 2
    assert [r["mechanism"] for r in PrivacyLedger(ledger).releases()] == ["gaussian-count", "dp-sgd"]  # no new count


def test_replayed_round_is_marked_and_paid_for_by_the_remaining_rounds(tmp_path, monkeypatch):
    """A coordinator resumed mid-round asks for that round again: counted twice, marked, target kept.

    Each node recalibrates its noise from its own ledger for the rounds still to come, so the run
    lands on target-epsilon instead of overshooting it by the replayed round.
    """
    from clients.node import handle_train, node_from_config
    from privacy import SEED_FROM_JOB_ENV
    from privacy.dp import rdp_epsilon

    # count release: both nodes release the same noised count (seeded from the job), so that their
    # first rounds' noise compares
    monkeypatch.setenv(SEED_FROM_JOB_ENV, "1")

    def run(folder, rounds_asked):
        folder.mkdir()
        ctx, ledger = _node(folder)
        spec = node_from_config(dict(ctx.node_config), {})
        msg, model = _msg()
        cfg = {**dict(msg.content["config"]), "target-epsilon": 3.0, "num-rounds": 3}
        del cfg["noise-multiplier"]
        noises = []
        for rnd in rounds_asked:
            _, m = handle_train(model.state_dict(), {**cfg, "server-round": rnd}, spec)
            noises.append(m["noise-multiplier"])
        return PrivacyLedger(ledger), noises

    plain, plain_noise = run(tmp_path / "plain", [1, 2, 3])
    replayed, replay_noise = run(tmp_path / "replayed", [1, 2, 2, 3])
    rows = replayed.releases("Cleveland")
    # count release: the count is released once, in round 1, ahead of the DP-SGD rounds
    assert [(r["mechanism"], r["round"], r["replay"]) for r in rows] == [
        ("gaussian-count", 1, 0), ("dp-sgd", 1, 0), ("dp-sgd", 2, 0), ("dp-sgd", 2, 1), ("dp-sgd", 3, 0)]
    assert plain.counts("Cleveland")[0]["value"] == replayed.counts("Cleveland")[0]["value"]
    for led in (plain, replayed):
        # the run's history holds the count release too: the calibration reserved it
        eps = rdp_epsilon(led.run_history("Cleveland", "r1"), _site_delta(led.counts("Cleveland")[0]["value"]))
        assert 2.95 <= eps <= 3.0 + 1e-9  # on target, never above
    assert replay_noise[0] == plain_noise[0] and replay_noise[-1] > plain_noise[-1]  # the replay costs later noise


def test_a_failed_task_tells_the_coordinator_no_record_value_and_is_audited(tmp_path):
    """A node whose data file went bad mid-run (re-exported after start-up) answers with a fixed reason.

    The cause (a data error naming a column and a row) stays in the node's own log; what leaves
    names only the node, the task and the error's type, and the audit log records the reply.
    """
    import csv
    import json

    from clients.app import FAILED

    path = load_department("health").export(tmp_path / "heart.csv", sites=["Cleveland"])
    rows = list(csv.DictReader(path.open()))
    rows[16]["chol"] = "MARKER4711x"  # one bad cell, row 17
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ctx, ledger = _node(tmp_path, releases='local_evaluation = "dp"')
    ctx.node_config = {**dict(ctx.node_config), "data": str(path), "audit-log": str(tmp_path / "audit.jsonl")}
    for kind in ("train", "evaluate"):
        reply = app(_msg(kind=kind)[0], ctx)
        assert reply.has_error() and reply.error.code == FAILED
        reason = reply.error.reason
        assert "health/Cleveland" in reason and "DataFileError" in reason and kind in reason
        for leak in ("MARKER4711", "row", "chol", str(path), path.name):
            assert leak not in reason, (leak, reason)
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    replies = [e["data"] for e in entries if e["kind"] == "reply"]
    assert [r["error_code"] for r in replies] == [FAILED, FAILED]
    assert all("MARKER4711" not in json.dumps(e) for e in entries)
    assert PrivacyLedger(ledger).releases("Cleveland") == []  # nothing was released


@pytest.mark.timeout(120)
@pytest.mark.parametrize("key,value", [
    ("target-epsilon", float("nan")), ("target-epsilon", -1.0), ("target-epsilon", 1e300), ("target-epsilon", 0.0),
    ("batch-size", 0), ("batch-size", -5), ("batch-size", 2.5), ("local-epochs", -1), ("local-epochs", True),
    ("num-rounds", 0), ("server-round", -1), ("lr", float("inf")), ("clipping-norm", float("nan")),
    ("proximal-mu", -0.1), ("personalise-epochs", -3), ("max-update-norm", 0.0),
])
def test_coordinator_numbers_the_node_cannot_honour_are_refused(tmp_path, key, value):
    """A NaN, a negative batch or an epsilon of 1e300 is refused naming the key; nothing is released.

    Before this check, target-epsilon = 1e300 hung the node in noise calibration, NaN was
    calibrated for, and a negative count failed with a generic error.
    """
    ctx, ledger = _node(tmp_path, releases='local_evaluation = "dp"')
    for kind in ("train", "evaluate"):
        msg, _ = _msg(kind=kind, **{key: value})
        if key == "target-epsilon":  # the node calibrates its noise for the target
            del msg.content["config"]["noise-multiplier"]
        reply = app(msg, ctx)
        assert reply.has_error() and reply.error.code == REFUSED, reply.error
        assert f"job config {key} = " in reply.error.reason
    assert PrivacyLedger(ledger).releases("Cleveland") == []


def test_a_target_epsilon_within_the_budget_is_calibrated_for(tmp_path):
    ctx, ledger = _node(tmp_path)
    msg, _ = _msg()
    cfg = msg.content["config"]
    del cfg["noise-multiplier"]
    cfg["target-epsilon"], cfg["num-rounds"] = 3, 2  # an int epsilon is a number too
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error
    assert 0 < PrivacyLedger(ledger).epsilon("Cleveland", DELTA) <= 3


def test_secagg_reply_is_audited_as_the_masked_update_that_leaves(tmp_path):
    """The collect-layout reply is audited once, as what leaves.

    This message carries no SecAgg+ configs record, so Flower's mod does not run: the node's policy
    allows unmasked updates and the bounded update leaves in the clear, which the audit log must
    say (it said ``masked: true``). The masked case is tests/test_secagg_collect_audit.py.
    """
    import json

    from flwr.common import FitIns, ndarrays_to_parameters

    from contract.keys import PARAM_NAMES_KEY
    from flower_compat.secagg import recorddict_compat as compat

    ctx, ledger = _node(tmp_path)
    ctx.node_config = {**dict(ctx.node_config), "audit-log": str(tmp_path / "audit.jsonl")}
    plain, model = _msg()
    cfg = {**dict(plain.content["config"]), PARAM_NAMES_KEY: "\n".join(model.state_dict())}
    arrays = [v.numpy() for v in model.state_dict().values()]
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), cfg), keep_input=True)
    reply = app(Message(content, dst_node_id=1, message_type="train"), ctx)
    assert not reply.has_error()
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    replies = [e["data"] for e in entries if e["kind"] == "reply"]
    assert len(replies) == 1, replies  # one entry per reply that leaves, not the inner plain one too
    r = replies[0]
    assert r["message"] == "train (SecAgg+ collect)" and r["run"] == "r1" and r["round"] == 1
    assert {a["name"] for a in r["arrays"]} == set(model.state_dict()) and not any(a["masked"] for a in r["arrays"])
    assert r["metrics"] == sorted(dict(compat.recorddict_to_fitres(reply.content, keep_input=True).metrics))
    # a refusal inside the protocol: one entry, with the error, no arrays
    (tmp_path / "b").mkdir()
    ctx2, _ = _node(tmp_path / "b")
    ctx2.node_config = {**dict(ctx2.node_config), "audit-log": str(tmp_path / "b" / "audit.jsonl")}
    weak = {**cfg, "noise-multiplier": 0.1}
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), weak), keep_input=True)
    reply = app(Message(content, dst_node_id=1, message_type="train"), ctx2)
    assert reply.has_error() and reply.error.code == REFUSED
    entries = [json.loads(line) for line in (tmp_path / "b" / "audit.jsonl").read_text().splitlines()]
    replies = [e["data"] for e in entries if e["kind"] == "reply"]
    assert len(replies) == 1 and replies[0]["error_code"] == REFUSED and "arrays" not in replies[0]
