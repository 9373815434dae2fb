"""Secure aggregation (SecAgg+) through the same ServerApp/ClientApp over the in-process grid."""

import pickle
import time
from types import SimpleNamespace
import warnings

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant

import clients.app as capp_mod
import clients.secagg as csecagg
from clients.app import REFUSED, app as client_app
from clients.node import TRAIN_METRICS
from privacy.ledger import PrivacyLedger
from server.app import run_federation, settings
from server.secagg import MAX_WEIGHT
from simulations.inprocess import InProcessGrid

warnings.filterwarnings("ignore", category=UserWarning)
from fed_helpers import POLICY, SITES, health_nodes, site_delta  # noqa: E402
CLIP = 8.0  # secagg-clipping-range default


def _nodes(tmp_path, eps=(8.0, 8.0, 8.0)):
    return health_nodes(tmp_path, eps)


def _cfg(tmp_path, **kw):
    # a fixed noise multiplier skips the nodes' (slow) noise calibration; tests of epsilon pass target-epsilon
    cfg = {"department": "health", "num-rounds": 2, "local-epochs": 1, "batch-size": 64, "lr": 0.02,
           "noise-multiplier": 1.0, "run-dir": str(tmp_path / "run"), "secagg": True}
    cfg.update(kw)
    return cfg


@pytest.fixture
def captured(monkeypatch):
    """Record, inside each node, the global it got and the weights/update it computed.

    Returns a list of dicts: round, site, n (num-examples), global, new, update (float64).
    """
    seen = []
    real = capp_mod.handle_train

    def recording(state, cfg, spec):
        new, metrics = real(state, cfg, spec)
        seen.append({"round": int(cfg["server-round"]), "site": spec.site, "n": int(metrics["num-examples"]),
                     "global": {k: v.double().numpy() for k, v in state.items()},
                     "new": {k: v.double().numpy() for k, v in new.items()},
                     "update": {k: (new[k].double() - state[k].double()).numpy() for k in state}})
        return new, metrics

    monkeypatch.setattr(capp_mod, "handle_train", recording)
    return seen


def _weighted_mean(updates):
    total = sum(u["n"] for u in updates)
    return {k: sum(u["n"] * u["update"][k] for u in updates) / total for k in updates[0]["update"]}, total


def _tolerance(updates):
    """Bound of SecAgg+'s quantisation error on the mean (stochastic rounding: < 1 step per node)."""
    total = sum(u["n"] for u in updates)
    return len(updates) * (2 * CLIP / 2 ** 22) * MAX_WEIGHT / total + 1e-6


def _assert_round_is_mean(before, after, updates):
    mean, _ = _weighted_mean(updates)
    tol = _tolerance(updates)
    scale = max(float(np.abs(m).max()) for m in mean.values())
    assert scale > 100 * tol  # the comparison is not vacuous
    err = max(float(np.abs(after[k].astype(np.float64) - before[k] - mean[k]).max()) for k in mean)
    assert err <= tol, (err, tol)


def test_secagg_global_model_is_the_weighted_mean_and_resume_works(tmp_path, captured):
    nodes = _nodes(tmp_path)
    ckpt = tmp_path / "run" / "checkpoint.pkl"
    globals_after = {}

    def on_round(entry):
        globals_after[entry["round"]] = pickle.load(open(ckpt, "rb"))["arrays"]

    res = run_federation(InProcessGrid(client_app, nodes), _cfg(tmp_path), run_id="s1", on_round=on_round)
    assert res["status"] == "completed" and [e["round"] for e in res["rounds"]] == [1, 2]
    # results.json records the minimums the run used: SecAgg+ raises them to 3
    assert res["config"]["min-accepted"] == 3 and res["config"]["min-nodes"] >= 3
    for rnd in (1, 2):
        entry = res["rounds"][rnd - 1]
        for phase in ("train", "evaluate"):  # timing: duration and wall-clock start (latency benchmark)
            assert entry[phase]["seconds"] > 0 and abs(entry[phase]["started"] - time.time()) < 600
        ups = [c for c in captured if c["round"] == rnd]
        assert sorted(u["site"] for u in ups) == sorted(SITES[:3])
        before = ups[0]["global"]
        if rnd == 2:  # the nodes trained from the secure aggregate of round 1
            assert all(np.array_equal(before[k], globals_after[1][k].astype(np.float64)) for k in before)
        _assert_round_is_mean(before, globals_after[rnd], ups)
        entry = res["rounds"][rnd - 1]
        assert entry["train"]["accepted"] == 3 and set(entry["train"]["nodes"]) == {1, 2, 3}
        assert entry["train"]["aggregate"]["aggregate-update-norm"] > 0
        # nodes decline to score the coordinator's model on their test records (policy default)
        declined = entry["evaluate"]["declined"]
        assert entry["evaluate"]["aggregate"] is None and len(declined) >= 3
        assert all("local_evaluation" in why for why in declined.values())
    # checkpoint/resume: a third round continues from the checkpoint, under SecAgg+ too
    captured.clear()
    res = run_federation(InProcessGrid(client_app, nodes), _cfg(tmp_path, **{"num-rounds": 3, "resume": True}),
                         run_id="other", on_round=on_round)
    assert res["run_id"] == "s1" and [e["round"] for e in res["rounds"]] == [1, 2, 3]
    assert all(c["round"] == 3 for c in captured)
    _assert_round_is_mean(captured[0]["global"], globals_after[3], captured)
    assert [r["round"] for r in PrivacyLedger(nodes[0]["ledger"]).releases("Cleveland")] == [1, 2, 3]


class RecordingGrid(InProcessGrid):
    """The in-process grid, recording every reply the coordinator receives."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.replies = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def _arrays_in(reply):
    """Every array a reply carries: ArrayRecords, and ndarrays serialised in config lists (masked vectors)."""
    if reply.has_error():
        return []
    out = [a.numpy() for rec in reply.content.array_records.values() for a in rec.values()]
    for rec in reply.content.config_records.values():
        for v in rec.values():
            for item in v if isinstance(v, list) else [v]:
                if isinstance(item, bytes):
                    try:
                        out.append(bytes_to_ndarray(item))
                    except Exception:  # keys, ciphertexts: not arrays
                        pass
    return out


def _leaks(replies, captured):
    secrets = [s for c in captured for kind in ("new", "update") for s in c[kind].values()]
    hits = 0
    for reply in replies:
        for arr in _arrays_in(reply):
            for s in secrets:
                if arr.shape == s.shape and np.allclose(arr.astype(np.float64), s, rtol=0, atol=1e-3 * np.abs(s).max()):
                    hits += 1
    return hits


def test_coordinator_never_receives_an_individual_update(tmp_path, captured):
    # the detector finds every node's weights in a plain run ...
    (tmp_path / "p").mkdir()
    plain = RecordingGrid(client_app, _nodes(tmp_path / "p"))
    run_federation(plain, _cfg(tmp_path / "p", **{"num-rounds": 1, "secagg": False}), run_id="p")
    assert _leaks(plain.replies, captured) >= 3 * 4  # 3 nodes x 4 weight arrays (at least)
    captured.clear()
    # ... and nothing under SecAgg+: only masked vectors and metrics reach the coordinator
    grid = RecordingGrid(client_app, _nodes(tmp_path))
    res = run_federation(grid, _cfg(tmp_path, **{"num-rounds": 1}), run_id="s")
    assert res["rounds"][0]["train"]["accepted"] == 3 and len(captured) == 3
    assert all(set(m) <= set(TRAIN_METRICS) for m in res["rounds"][0]["train"]["nodes"].values())  # whitelist kept
    assert len(grid.replies) >= 4 * 3  # four protocol stages x 3 nodes, plus evaluation
    assert _leaks(grid.replies, captured) == 0
    masked = [a for r in grid.replies for a in _arrays_in(r)]
    assert masked  # the masked vectors were inspected (decoded), not skipped


def _accountant_epsilon(rows, delta):
    acc = RDPAccountant()
    acc.history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in rows if r["status"] == "committed"]
    return acc.get_epsilon(delta=delta)


def test_secagg_ledgers_and_a_policy_refusal(tmp_path, captured):
    nodes = _nodes(tmp_path, eps=(8.0, 8.0, 8.0, 1.0))  # Switzerland's budget is too small: it refuses
    cfg = _cfg(tmp_path, **{"target-epsilon": 3.0, "noise-multiplier": -1.0})  # nodes calibrate to the target
    res = run_federation(InProcessGrid(client_app, nodes), cfg, run_id="r")
    assert res["status"] == "completed"
    assert {(r["round"], r["node"], r["code"]) for r in res["refused"]} == {(1, 4, REFUSED), (2, 4, REFUSED)}
    assert all("max_epsilon" in r["reason"] for r in res["refused"])
    assert PrivacyLedger(nodes[3]["ledger"]).releases("Switzerland") == []
    ckpt = pickle.load(open(tmp_path / "run" / "checkpoint.pkl", "rb"))
    ups = [c for c in captured if c["round"] == 2]
    assert len(ups) == 3
    _assert_round_is_mean(ups[0]["global"], ckpt["arrays"], ups)  # the refusing node's masks were removed
    for i, n in enumerate(nodes[:3], start=1):
        led = PrivacyLedger(n["ledger"])
        rows = led.releases(n["site"])
        assert [r["round"] for r in rows] == [1, 2] and all(r["status"] == "committed" for r in rows)
        eps = led.epsilon(n["site"], site_delta(n["site"]))
        assert eps == pytest.approx(_accountant_epsilon(rows, site_delta(n["site"])), rel=1e-9)
        assert 2.5 < eps <= 3.0 + 1e-6  # calibrated by the node for the whole run, as without SecAgg+
        assert res["rounds"][1]["train"]["nodes"][i]["epsilon"] == pytest.approx(eps, rel=1e-9)


class DropInCollectStage(InProcessGrid):
    """Node ``victim`` trains but its masked vector never reaches the coordinator."""

    victim = 2

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        collect = any("fitins.parameters" in m.content.array_records for m in messages)
        return [r for r in replies if not (collect and r.metadata.src_node_id == self.victim)]


def test_secagg_tolerates_a_dropout_after_training(tmp_path, captured):
    nodes = _nodes(tmp_path, eps=(8.0, 8.0, 8.0, 8.0))
    res = run_federation(DropInCollectStage(client_app, nodes), _cfg(tmp_path, **{"num-rounds": 1}), run_id="d")
    train = res["rounds"][0]["train"]
    assert train["accepted"] == 3 and set(train["nodes"]) == {1, 3, 4} and train["secagg"]["dropped"] == [2]
    ckpt = pickle.load(open(tmp_path / "run" / "checkpoint.pkl", "rb"))
    kept = [c for c in captured if c["site"] != SITES[1]]
    assert len(kept) == 3 and len(captured) == 4  # node 2 trained (and spent budget) but was not aggregated
    _assert_round_is_mean(kept[0]["global"], ckpt["arrays"], kept)
    assert len(PrivacyLedger(nodes[1]["ledger"]).releases(SITES[1])) == 1


def test_secagg_round_with_two_contributors_ends_the_run_unchanged(tmp_path):
    nodes = _nodes(tmp_path, eps=(8.0, 8.0, 1.0))  # one of three refuses: the other two could unmask each other
    res = run_federation(InProcessGrid(client_app, nodes), _cfg(tmp_path), run_id="t")
    assert res["status"].startswith("stopped:") and "min-accepted=3" in res["status"]
    assert [e["round"] for e in res["rounds"]] == [1]
    assert res["rounds"][0]["train"]["accepted"] == 0 or "stopped" in res["rounds"][0]["train"]
    assert pickle.load(open(tmp_path / "run" / "checkpoint.pkl", "rb"))["round"] == 0  # nothing applied


def test_secagg_rejects_an_oversized_aggregate(tmp_path, captured, monkeypatch):
    # a node that skips its own clipping and sends 200x its update: only the aggregate can be checked
    real = capp_mod.handle_train

    def inflating(state, cfg, spec):
        new, metrics = real(state, cfg, spec)
        if spec.site == "Hungary":
            new = {k: state[k] + 200 * (new[k] - state[k]) for k in state}
        return new, metrics

    monkeypatch.setattr(capp_mod, "handle_train", inflating)
    monkeypatch.setattr(csecagg, "bound_update", lambda u, max_norm, coord: (u, 1.0))
    res = run_federation(InProcessGrid(client_app, _nodes(tmp_path)),
                         _cfg(tmp_path, **{"num-rounds": 1, "max-update-norm": 20.0}), run_id="x")
    assert res["status"] == "completed"
    assert [x["node"] for x in res["excluded"]] == ["secure-aggregate"]
    assert "max-update-norm" in res["excluded"][0]["reason"]
    assert res["rounds"][0]["train"]["rejected"]
    final = torch.load(tmp_path / "run" / "model.pt")
    initial = captured[0]["global"]
    assert all(np.array_equal(final[k].double().numpy(), initial[k]) for k in initial)  # global model unchanged


def test_node_bounds_its_update_to_norm_and_quantisation_range():
    u = [np.array([3.0, 4.0]), np.array([0.0])]
    out, s = csecagg.bound_update(u, max_norm=1.0, coord_bound=10.0)
    assert s == pytest.approx(0.2) and np.linalg.norm(np.concatenate(out)) == pytest.approx(1.0)
    out, s = csecagg.bound_update(u, max_norm=100.0, coord_bound=2.0)
    assert s == pytest.approx(0.5) and np.abs(np.concatenate(out)).max() == pytest.approx(2.0)
    out, s = csecagg.bound_update(u, max_norm=100.0, coord_bound=10.0)
    assert s == 1.0 and out is u


def test_node_scales_its_update_into_the_quantisation_range(monkeypatch):
    # the adapter alone: a node whose update would be clipped coordinate-wise by secaggplus_mod scales it instead
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # Messages need a task identity
    glob = {"w": torch.zeros(4), "b": torch.zeros(2)}
    new = {"w": torch.tensor([0.5, -2.0, 0.1, 0.0]), "b": torch.tensor([1.0, 0.0])}
    cfg = {"max-update-norm": 1000.0, csecagg.PARAM_NAMES_KEY: "w\nb", "server-round": 1}
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([glob["w"].numpy(), glob["b"].numpy()]), cfg),
                                          keep_input=True)
    msg = Message(content, dst_node_id=1, message_type="train")
    for attr in ("_run_id", "_node_id", "_task_id"):  # like a node process (Ray actor, SuperNode): no task identity
        monkeypatch.setattr(TaskIdentity, attr, None)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    ctx.state.config_records[RECORD_KEY_STATE] = ConfigRecord({"clipping_range": 0.5, "max_weight": 1000.0})

    def fake_train(m, spec):
        assert dict(m.content["config"]) == {"max-update-norm": 1000.0, "server-round": 1}  # names stripped
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": 500})}),
                       reply_to=m)

    reply = csecagg.secagg_train(msg, SimpleNamespace(department="health", site="Cleveland"), ctx, fake_train)
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    w, b = parameters_to_ndarrays(fitres.parameters)
    # update * 500/1000 must stay within +-0.5: the largest coordinate (-2.0) is scaled to -1.0, the rest alike
    np.testing.assert_allclose(w, [0.25, -1.0, 0.05, 0.0])
    np.testing.assert_allclose(b, [0.5, 0.0])
    assert fitres.num_examples == 500 and dict(fitres.metrics) == {"num-examples": 500}


@pytest.mark.parametrize("bad, key", [
    ({"strategy": "krum"}, "strategy"), ({"strategy": "trimmed-mean"}, "strategy"), ({"strategy": "fedprox"}, "strategy"),
    ({"secagg-num-shares": 4}, "secagg-num-shares"), ({"secagg-num-shares": 2}, "secagg-num-shares"),
    ({"secagg-threshold": 3}, "secagg-threshold"), ({"secagg-threshold": 1}, "secagg-threshold"),
    ({"secagg-clipping-range": 0.0}, "secagg-clipping-range"), ({"secagg-clipping-range": float("inf")}, "secagg-clipping-range"),
])
def test_secagg_settings_errors_name_the_key(bad, key):
    with pytest.raises(ValueError, match=repr(key)):
        settings({"department": "health", "secagg": True, **bad})


def test_secagg_settings_accept_mean_based_strategies():
    for name in ("fedavg", "fedadam", "fedyogi"):
        cfg = settings({"department": "health", "secagg": True, "strategy": name, "secagg-num-shares": 5,
                        "secagg-threshold": 3})
        assert cfg["secagg"] and cfg["secagg-num-shares"] == 5
    assert settings({"department": "health", "strategy": "krum"})["secagg"] is False  # krum alone is fine
