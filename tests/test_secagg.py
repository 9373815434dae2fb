"""Secure aggregation (SecAgg+) through the same ServerApp/ClientApp over the in-process grid."""

import json
import time
from types import SimpleNamespace
import warnings

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

import clients.app as capp_mod
import clients.secagg as csecagg
from clients.app import REFUSED, app as client_app
from clients.node import public_count
from contract.keys import PARAM_NAMES_KEY
from contract.tasks import TRAIN_METRICS
from flower_compat.inprocess import set_task_identity
from flower_compat.secagg import RECORD_KEY_STATE
from flower_compat.secagg import recorddict_compat as compat
from flower_compat.testing import TaskIdentity
from privacy.ledger import PrivacyLedger
from privacy.policy import load_policy
from server.app import run_federation, settings
from server.secagg import MAX_WEIGHT
from server.strategy import load_checkpoint
from simulations.inprocess import InProcessGrid

warnings.filterwarnings("ignore", category=UserWarning)
from fed_helpers import POLICY, SITES, health_nodes  # noqa: E402
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


def _released(nodes):
    """Each site's training-record count as its node released it (noised once, in its ledger): its SecAgg+ weight."""
    return {n["site"]: PrivacyLedger(n["ledger"]).counts(n["site"], split="train")[0]["value"] for n in nodes}


def _assert_weights_are_released(updates, nodes):
    """Each node weighted its masked update by its released count (num-examples), never by its exact count."""
    rows = {n["site"]: PrivacyLedger(n["ledger"]).counts(n["site"], split="train") for n in nodes}
    assert all(len(r) == 1 for r in rows.values())  # released once, reused by every round (and the resumed run)
    released = _released(nodes)
    assert all(u["n"] == released[u["site"]] for u in updates), ([(u["site"], u["n"]) for u in updates], released)
    # the check tells the released weights from the exact ones: the noise moved at least one count
    assert any(rows[u["site"]][0]["exact"] != u["n"] for u in updates)


def _round_error(before, after, updates):
    """Largest coordinate difference between the round's aggregate step and the updates' weighted mean."""
    mean, _ = _weighted_mean(updates)
    return max(float(np.abs(after[k].astype(np.float64) - before[k] - mean[k]).max()) for k in mean)


def _assert_round_is_mean(before, after, updates):
    mean, _ = _weighted_mean(updates)
    tol = _tolerance(updates)
    scale = max(float(np.abs(m).max()) for m in mean.values())
    assert scale > 100 * tol  # the comparison is not vacuous
    err = _round_error(before, after, updates)
    assert err <= tol, (err, tol)


def test_secagg_global_model_is_the_weighted_mean_and_resume_works(tmp_path, captured):
    nodes = _nodes(tmp_path)
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    globals_after = {}

    def on_round(entry):
        globals_after[entry["round"]] = load_checkpoint(ckpt)["arrays"]

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
        # the weights are the counts the nodes released (noised, in their ledgers), not their exact counts
        _assert_weights_are_released(ups, nodes[:3])
        _assert_round_is_mean(before, globals_after[rnd], ups)
        exact = {n["site"]: PrivacyLedger(n["ledger"]).counts(n["site"], split="train")[0]["exact"] for n in nodes[:3]}
        by_exact = [{**u, "n": exact[u["site"]]} for u in ups]  # the mean weighted by the exact counts does not match
        assert _round_error(before, globals_after[rnd], by_exact) > 10 * _tolerance(ups)
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
    _assert_weights_are_released(captured, nodes[:3])  # the resumed run reuses the released counts
    _assert_round_is_mean(captured[0]["global"], globals_after[3], captured)
    # round 1 first released the node's (noised) training-record count, once for all runs
    assert [(r["mechanism"], r["round"]) for r in PrivacyLedger(nodes[0]["ledger"]).releases("Cleveland")] == [
        ("gaussian-count", 1), ("dp-sgd", 1), ("dp-sgd", 2), ("dp-sgd", 3)]


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
    assert PrivacyLedger(nodes[3]["ledger"]).counts() == []  # refused outright: no record count released either
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    ups = [c for c in captured if c["round"] == 2]
    assert len(ups) == 3
    _assert_weights_are_released(ups, nodes[:3])
    _assert_round_is_mean(ups[0]["global"], ckpt["arrays"], ups)  # the refusing node's masks were removed
    for i, n in enumerate(nodes[:3], start=1):
        led = PrivacyLedger(n["ledger"])
        rows = led.releases(n["site"])
        # the count release (round 1, before training) is in the ledger and in the run's epsilon
        assert [(r["mechanism"], r["round"]) for r in rows] == [("gaussian-count", 1), ("dp-sgd", 1), ("dp-sgd", 2)]
        assert all(r["status"] == "committed" for r in rows)
        # the node's delta (and so its epsilon) follows its released count, not the exact one
        delta = public_count(_released([n])[n["site"]], load_policy(n["policy"]))[1]
        assert delta == pytest.approx(min(1 / (10 * _released([n])[n["site"]]), 1e-3), rel=1e-12)
        eps = led.epsilon(n["site"], delta)
        assert eps == pytest.approx(_accountant_epsilon(rows, delta), rel=1e-9)
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
    assert train["accepted"] == 3 and set(train["nodes"]) == {1, 3, 4}
    assert [(d["node"], d["stage"]) for d in train["secagg"]["dropped"]] == [(2, "collect_masked_vectors")]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    kept = [c for c in captured if c["site"] != SITES[1]]
    assert len(kept) == 3 and len(captured) == 4  # node 2 trained (and spent budget) but was not aggregated
    _assert_weights_are_released(kept, [n for n in nodes if n["site"] != SITES[1]])
    _assert_round_is_mean(kept[0]["global"], ckpt["arrays"], kept)
    # the dropped node released its (noised) count, then trained: both stay spent
    assert [r["mechanism"] for r in PrivacyLedger(nodes[1]["ledger"]).releases(SITES[1])] == ["gaussian-count", "dp-sgd"]


def test_secagg_round_with_two_contributors_ends_the_run_unchanged(tmp_path):
    nodes = _nodes(tmp_path, eps=(8.0, 8.0, 1.0))  # one of three refuses: the other two could unmask each other
    res = run_federation(InProcessGrid(client_app, nodes), _cfg(tmp_path), run_id="t")
    assert res["status"].startswith("stopped:") and "min-accepted=3" in res["status"]
    assert [e["round"] for e in res["rounds"]] == [1]
    assert res["rounds"][0]["train"]["accepted"] == 0 or "stopped" in res["rounds"][0]["train"]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["round"] == 0  # nothing applied


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
    final = load_file(tmp_path / "run" / "model.safetensors")
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
    set_task_identity(1, 0, 1)  # Messages need a task identity
    glob = {"w": torch.zeros(4), "b": torch.zeros(2)}
    new = {"w": torch.tensor([0.5, -2.0, 0.1, 0.0]), "b": torch.tensor([1.0, 0.0])}
    cfg = {"max-update-norm": 1000.0, PARAM_NAMES_KEY: "w\nb", "server-round": 1}
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


# --------------------------------------------------------------------------- dropouts and deadlines (issue 11)


def _exchange(messages):
    """(round, stage) of an exchange: the SecAgg+ stage, else the message type ('train', 'evaluate')."""
    m = messages[0]
    cfg = m.content.config_records.get("secaggplus_configs")
    stage = cfg["stage"] if cfg is not None and "stage" in cfg else m.metadata.message_type
    if str(m.metadata.group_id).isdigit():
        return int(m.metadata.group_id), stage
    return int(m.content["config"]["server-round"]), stage


class ClockedGrid(InProcessGrid):
    """The in-process grid with simulated time, behaving like Flower's deployment grid.

    Every reply takes ``TOOK[stage]`` (simulated) seconds. A node in ``silent`` as
    ``{node: (round, stage)}`` stops answering from that exchange on (killed): the grid then
    waits until the ``timeout`` it was given (the deadline, which must be bounded) and returns
    the others' replies; from then on the node is no longer listed as connected. ``exchanges``
    records (round, stage, timeout) of every exchange; ``clock``/``sleep`` are the simulated
    time the coordinator's deadlines use.
    """

    TOOK = {"train": 8.0, "evaluate": 0.5, "setup": 0.4, "share_keys": 0.3, "collect_masked_vectors": 8.0,
            "unmask": 0.3}

    def __init__(self, *a, silent=None, **kw):
        super().__init__(*a, **kw)
        self.now = 1000.0
        self.silent = dict(silent or {})
        self.dead: set[int] = set()
        self.exchanges: list[tuple] = []
        self.last_arrivals: dict[int, float] = {}

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def get_node_ids(self):
        return [n for n in self.contexts if n not in self.dead]

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages:
            return []
        rnd, stage = _exchange(messages)
        self.exchanges.append((rnd, stage, timeout))
        self.dead |= {node for node, when in self.silent.items() if when == (rnd, stage)}
        live = [m for m in messages if m.metadata.dst_node_id not in self.dead]
        replies = list(super().send_and_receive(live, timeout=timeout))
        took = self.TOOK[stage]
        self.last_arrivals = {int(r.metadata.src_node_id): took for r in replies}
        if len(live) < len(messages):  # a node is silent: the coordinator waits for it until its deadline
            assert timeout is not None and timeout < 3600, f"round {rnd} {stage}: waits {timeout} s for a dead node"
            self.now += timeout
        else:
            self.now += took
        return replies


def _no_keyerror(res):
    text = json.dumps(res, default=str)
    assert "KeyError" not in text and "<class" not in text, text


@pytest.mark.parametrize(("stage", "shares"), [("setup", 5), ("share_keys", 3), ("collect_masked_vectors", 3),
                                              ("unmask", 3)])
def test_secagg_survives_one_silent_node_in_any_stage(tmp_path, captured, stage, shares):
    # 4 hospitals, default settings (secagg-num-shares 3, threshold 2, round-timeout auto): node 2 stops
    # answering at `stage` of round 1. Before the fix a dropout before share-keys finished made the
    # other nodes raise KeyError in the unmask stage and the protocol halted. A dropout at setup
    # leaves its neighbours fewer than 2 others to mask with under 3 shares (refused since
    # 2026-12-06: test_a_setup_dropout_under_three_shares_...); with 5 shares each keeps 2.
    nodes = _nodes(tmp_path, eps=(8.0, 8.0, 8.0, 8.0))
    grid = ClockedGrid(client_app, nodes, silent={2: (1, stage)})
    res = run_federation(grid, _cfg(tmp_path, **{"num-rounds": 1, "secagg-num-shares": shares}), run_id="d")
    _no_keyerror(res)
    assert res["status"] == "completed", res["status"]
    train = res["rounds"][0]["train"]
    contributors = {1, 2, 3, 4} if stage == "unmask" else {1, 3, 4}  # in unmask node 2's vector is already in
    assert set(train["nodes"]) == contributors and train["accepted"] == len(contributors)
    [drop] = train["secagg"]["dropped"]
    assert drop["node"] == 2 and drop["stage"] == stage
    # round 1: no earlier time to measure, the first-exchange deadline (10 min) applies, named in the reason
    assert "no reply to SecAgg+" in drop["reason"] and "within 600 s" in drop["reason"], drop
    assert res["refused"] == [] and res["dropped"] == [{"round": 1, **drop}]
    assert (1, stage, 600.0) in grid.exchanges
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    used = [c for c in captured if c["site"] in {SITES[n - 1] for n in contributors}]
    assert len(used) == len(contributors)
    _assert_round_is_mean(used[0]["global"], ckpt["arrays"], used)
    trained = {c["site"] for c in captured}
    assert (SITES[1] in trained) == (stage == "unmask")  # a node silent from the collect stage on never trained


def test_a_setup_dropout_under_three_shares_stops_the_round_before_anyone_trains(tmp_path, captured):
    # default shares (3) among 4 hospitals: node 2 silent at setup leaves nodes 1 and 3 one other
    # node each to mask with, which they refuse (one 32-bit mask seed would hide the update); too
    # few remain for min-accepted 3: the round stops cleanly, nobody trained or spent budget
    nodes = _nodes(tmp_path, eps=(8.0, 8.0, 8.0, 8.0))
    grid = ClockedGrid(client_app, nodes, silent={2: (1, "setup")})
    res = run_federation(grid, _cfg(tmp_path, **{"num-rounds": 1}), run_id="d3")
    _no_keyerror(res)
    assert res["status"].startswith("stopped: round 1:"), res["status"]
    assert "neighbour(s) to mask with, fewer than 2" in res["status"], res["status"]
    assert captured == []  # nobody trained


def test_secagg_three_nodes_one_gone_before_round_2_stops_cleanly_before_training(tmp_path, captured):
    # the guide's city: 3 hospitals; node 3 is killed between rounds 1 and 2 (silent from round 2's setup)
    grid = ClockedGrid(client_app, _nodes(tmp_path), silent={3: (2, "setup")})
    res = run_federation(grid, _cfg(tmp_path, **{"num-rounds": 3}), run_id="g")
    _no_keyerror(res)
    assert res["status"].startswith("stopped: round 2:"), res["status"]
    assert "node 3" in res["status"] and "min-accepted=3" in res["status"]
    assert [e["round"] for e in res["rounds"]] == [1, 2]  # no round lost or repeated
    assert load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["round"] == 1
    assert {c["round"] for c in captured} == {1}  # nobody trained (or spent budget) for the aborted round
    # the setup stage of round 2 waited the floor (30 s: round 1's setup took 0.4 s), not an hour
    assert (2, "setup", 30.0) in grid.exchanges and not [e for e in grid.exchanges if e[0] == 2 and e[1] != "setup"]
    [drop] = res["rounds"][1]["train"]["secagg"]["dropped"]
    assert drop["node"] == 3 and drop["stage"] == "setup" and "within 30 s" in drop["reason"] and "floor" in drop["reason"]
    assert res["refused"] == []


def test_secagg_three_nodes_one_killed_while_training_stops_without_unmasking(tmp_path, captured):
    grid = ClockedGrid(client_app, _nodes(tmp_path), silent={3: (2, "collect_masked_vectors")})
    res = run_federation(grid, _cfg(tmp_path, **{"num-rounds": 3}), run_id="k")
    _no_keyerror(res)
    assert res["status"].startswith("stopped: round 2:") and "min-accepted=3" in res["status"], res["status"]
    # the deadline is 5 x the slowest reply measured in round 1's collect stage (8 s): 40 s, named with its basis
    assert "node 3 (no reply to SecAgg+ collect" in res["status"] and "within 40 s" in res["status"]
    assert "round 1's 8.0 s" in res["status"]
    assert (2, "collect_masked_vectors", 40.0) in grid.exchanges
    assert (2, "unmask") not in {e[:2] for e in grid.exchanges}  # the two-node sum is never unmasked
    assert [e["round"] for e in res["rounds"]] == [1, 2]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["round"] == 1


def test_secagg_three_nodes_one_lost_in_unmask_completes_the_round_then_waits_bounded(tmp_path, captured):
    # node 3 dies after sending its masked vector: its mask is recovered from the others' shares and the
    # round counts 3 contributors; round 2 then waits (bounded) for a third connected node and ends cleanly
    grid = ClockedGrid(client_app, _nodes(tmp_path), silent={3: (1, "unmask")})
    res = run_federation(grid, _cfg(tmp_path, **{"num-rounds": 2}), run_id="u")
    _no_keyerror(res)
    first = res["rounds"][0]["train"]
    assert first["accepted"] == 3 and set(first["nodes"]) == {1, 2, 3}
    assert [d["node"] for d in first["secagg"]["dropped"]] == [3]
    ckpt_1 = res["rounds"][0]
    assert "aggregate" in ckpt_1["train"]
    # evaluation is optional: with 2 of the 3 nodes SecAgg+ needs connected it is skipped at once, with the reason
    assert "2 node(s) connected, the round needs 3" in ckpt_1["evaluate"]["skipped"]
    assert [e for e in grid.exchanges if e[1] == "evaluate"] == []
    assert res["status"].startswith("stopped: round 2:"), res["status"]
    assert "node 3" in res["status"] and "connected" in res["status"] and "30 s" in res["status"]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["round"] == 1


def test_plain_round_drops_a_silent_node_after_a_measured_deadline(tmp_path, captured):
    # without SecAgg+, default settings: node 3 stops answering in round 2's train step
    grid = ClockedGrid(client_app, _nodes(tmp_path), silent={3: (2, "train")})
    res = run_federation(grid, _cfg(tmp_path, **{"num-rounds": 3, "secagg": False}), run_id="p")
    assert res["status"] == "completed" and [e["round"] for e in res["rounds"]] == [1, 2, 3]
    trains = [(r, t) for r, s, t in grid.exchanges if s == "train"]
    assert trains == [(1, 600.0), (2, 40.0), (3, 40.0)]  # first-exchange deadline, then 5 x round 1's 8 s
    second = res["rounds"][1]["train"]
    assert second["accepted"] == 2 and set(second["nodes"]) == {1, 2}
    assert second["dropped"] == [{"node": 3, "reason": "no reply to train within 40 s; deadline = 5 x round 1's 8.0 s"}]
    assert res["dropped"] == [{"round": 2, "stage": "train", **second["dropped"][0]}]
    assert set(res["rounds"][2]["train"]["nodes"]) == {1, 2}  # round 3 goes on with the others


def test_round_timeout_setting():
    assert settings({"department": "health"})["round-timeout"] == "auto"
    assert settings({"department": "health", "round-timeout": 45})["round-timeout"] == 45.0
    assert settings({"department": "health", "round-timeout": "auto:first=300,factor=4,floor=10"})["round-timeout"]
    for bad in (0, -1, "soon", "auto:factor=0.5", "auto:frist=10", "auto:floor=900", True, float("nan")):
        with pytest.raises(ValueError, match="'round-timeout'"):
            settings({"department": "health", "round-timeout": bad})


def test_node_answers_a_protocol_abort_with_a_readable_error_and_no_traceback(caplog):
    # a node asked (by a coordinator without the fix) for the key shares of a node that never shared any
    from flower_compat.secagg import RECORD_KEY_CONFIGS, Key, Stage
    from flower_compat.testing import SecAggPlusState

    set_task_identity(1, 0, 1)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    st = SecAggPlusState(current_stage=Stage.COLLECT_MASKED_VECTORS, nid=1, threshold=2)
    st.rd_seed_share_dict, st.sk1_share_dict = {1: b"a", 3: b"b"}, {1: b"c", 3: b"d"}
    ctx.state.config_records[RECORD_KEY_STATE] = ConfigRecord(st.to_dict())
    cfg = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 3], Key.DEAD_NODE_ID_LIST: [2]})
    msg = Message(RecordDict({RECORD_KEY_CONFIGS: cfg}), dst_node_id=1, message_type="train", group_id="1")
    caplog.set_level("DEBUG")
    reply = csecagg.conditional_secaggplus_mod(msg, ctx, lambda m, c: pytest.fail("no training in unmask"))
    assert reply.has_error() and reply.error.code == csecagg.SECAGG_ABORTED
    assert "unmask" in reply.error.reason and "node 2" in reply.error.reason and "KeyError" not in reply.error.reason
    assert RECORD_KEY_STATE not in ctx.state.config_records  # the next round starts from setup
    assert not [r for r in caplog.records if r.exc_info]  # one warning line, no traceback
    assert any("node 2" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_a_resumed_run_gives_each_kinds_first_exchange_the_first_deadline():
    """After ``fl-server stop`` and ``--resume`` the nodes start the run's app again (tens of seconds).

    The reply times measured before the stop (saved with the checkpoint) must not set the first
    exchange of the resumed run: a SecAgg+ setup measured at 0.4 s got the 30 s floor and every
    node was dropped while its worker restarted (docs/DEPLOYMENT.md walk, 2026-12-05).
    """
    from server.grid import Deadlines, RoundTimeout

    saved = {"setup": [{"round": 3, "seconds": 0.4}], "train": [{"round": 3, "seconds": 8.4}]}
    resumed = Deadlines(RoundTimeout.parse("auto"), saved)
    for kind in ("setup", "train"):
        seconds, basis = resumed.deadline(kind)
        assert seconds == 600.0 and "resumed" in basis, basis
    resumed.record("setup", 5, 27.0)  # the restart's cold exchange, then measured again as usual
    assert resumed.deadline("setup") == (135.0, "5 x round 5's 27 s")
    assert resumed.deadline("train")[0] == 600.0  # still the first train exchange since the resume
    resumed.record("train", 5, 2.0)
    assert resumed.deadline("train") == (42.0, "5 x round 3's 8.4 s")  # the saved history still counts
    assert resumed.measured is saved  # kept in the run's history (checkpointed)
    assert Deadlines(RoundTimeout.parse(45), saved).deadline("setup")[0] == 45.0  # a fixed timeout is fixed


def test_deadline_rule_and_the_superlink_answering_for_a_dead_node():
    from types import SimpleNamespace as NS

    from flower_compat.grid import NODE_UNAVAILABLE, SUPERLINK_NODE_ID
    from server.grid import DeadlineGrid, Deadlines, RoundTimeout

    # the rule: first exchange of a kind 600 s, then 5 x the slowest reply so far, within [30, 600] s
    d = Deadlines(RoundTimeout.parse("auto"))
    assert d.deadline("train")[0] == 600.0
    d.record("train", 1, 8.4)
    assert d.deadline("train") == (42.0, "5 x round 1's 8.4 s")
    d.record("train", 2, 3.0)  # a faster round does not shrink it: the slowest of the last 3 counts ...
    assert d.deadline("train")[0] == 42.0
    d.record("train", 3, 2.0)
    d.record("train", 4, 7.0)  # ... until round 1 (cold) is no longer among them
    assert d.deadline("train") == (35.0, "5 x round 4's 7.0 s")
    d.record("setup", 1, 0.4)
    assert d.deadline("setup")[0] == 30.0 and "floor" in d.deadline("setup")[1]
    d.record("evaluate", 1, 500.0)
    assert d.deadline("evaluate")[0] == 600.0 and "maximum" in d.deadline("evaluate")[1]
    tuned = Deadlines(RoundTimeout.parse("auto:first=120,factor=3,floor=5,max=60"))
    tuned.record("train", 1, 10.0)
    assert tuned.deadline("unmask")[0] == 120.0 and tuned.deadline("train")[0] == 30.0
    assert Deadlines(RoundTimeout.parse(45)).deadline("train") == (45.0, "round-timeout = 45 s")
    assert Deadlines(RoundTimeout.parse("auto"), bounded=False).deadline("train")[0] is None  # simulation

    # on the wire: node 101 answers, the SuperLink answers for 102 (no heartbeat), 103 says nothing
    set_task_identity(1, 0, 1)
    sent = [Message(RecordDict({"config": ConfigRecord({"server-round": 2})}), dst_node_id=n, message_type="train")
            for n in (101, 102, 103)]

    class Wire:
        now = 0.0

        def clock(self):
            return self.now

        def send_and_receive(self, messages, *, timeout=None):
            self.timeout = timeout
            self.now += timeout  # like Flower's grid: it waited until the deadline for 103
            for i, m in enumerate(messages):
                m.metadata.__dict__["_message_id"] = f"id{i}"
            ok = NS(metadata=NS(src_node_id=101, reply_to_message_id="id0"), has_error=lambda: False)
            gone = NS(metadata=NS(src_node_id=SUPERLINK_NODE_ID, reply_to_message_id="id1"), has_error=lambda: True,
                      error=NS(code=NODE_UNAVAILABLE, reason="Error: Node Unavailable"))
            self.last_arrivals = {101: 2.5, 102: 61.0}
            return [ok, gone]

    wire = Wire()
    deadlines = Deadlines(RoundTimeout.parse("auto"))
    deadlines.record("train", 1, 8.4)  # round 1 of this run took 8.4 s
    grid = DeadlineGrid(wire, deadlines)
    replies = grid.send_and_receive(sent, timeout=3600)
    assert wire.timeout == 42.0  # the caller's timeout is replaced by the measured deadline
    assert [r.metadata.src_node_id for r in replies] == [101]  # the SuperLink's error is not a node's refusal
    [ex] = grid.exchanges
    assert (ex.kind, ex.round, ex.replied) == ("train", 2, {101: 2.5})
    assert "unavailable after 61 s in train" in ex.missing[102] and "offline" in ex.missing[102]
    assert ex.missing[103] == "no reply to train within 42 s; deadline = 5 x round 1's 8.4 s"
    assert deadlines.measured["train"] == [{"round": 1, "seconds": 8.4}, {"round": 2, "seconds": 2.5}]
