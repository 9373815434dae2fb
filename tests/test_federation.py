"""ServerApp + ClientApp over the in-process grid: faults, refusals, resume."""

import json
import warnings

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from safetensors.torch import load_file

from clients.app import app as client_app
from privacy.ledger import PrivacyLedger
from server.app import run_federation
from server.strategy import load_checkpoint
from simulations.inprocess import InProcessGrid

warnings.filterwarnings("ignore", category=UserWarning)
from fed_helpers import POLICY, SITES, health_nodes, released_delta  # noqa: E402


def _released_delta(node) -> float:
    return released_delta(node["ledger"], node["site"], node["policy"])


def _nodes(tmp_path, eps=(8.0, 8.0, 8.0, 8.0)):
    return health_nodes(tmp_path, eps)


def _cfg(tmp_path, **kw):
    cfg = {"department": "health", "num-rounds": 3, "local-epochs": 2, "batch-size": 32, "lr": 0.02, "target-epsilon": 3.0,
           "run-dir": str(tmp_path / "run"), "min-nodes": 1, "central-data": "bundled"}
    cfg.update(kw)
    return cfg


def _acc(res, rnd):
    e = next(e for e in res["rounds"] if e["round"] == rnd)
    return e["central"]["accuracy"]  # the coordinator's exact score on data it holds (nodes release none)


def test_dp_federation_learns_and_ledgers_hold_target_epsilon(tmp_path):
    nodes = _nodes(tmp_path)
    res = run_federation(InProcessGrid(client_app, nodes), _cfg(tmp_path), run_id="r1")
    assert [e["round"] for e in res["rounds"]] == [1, 2, 3]
    assert _acc(res, 3) > 0.7
    for n in nodes:
        # at the delta the node accounts at: that of its released (noised) count, not of the exact one
        eps = PrivacyLedger(n["ledger"]).epsilon(n["site"], _released_delta(n))
        assert 2.5 < eps <= 3.0 + 1e-6  # calibrated by each node for the whole run
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["rounds"][-1]["train"]["accepted"] == 4
    assert (tmp_path / "run" / "model.safetensors").exists()


def _tamper(kind):
    def t(node, reply):
        if node != 2:
            return reply
        arrays = reply.content["arrays"].to_numpy_ndarrays()
        keys = list(reply.content["arrays"].keys())
        if kind == "nan":
            arrays[0] = arrays[0] * np.nan
        elif kind == "shape":
            arrays[0] = np.zeros((3, 3), dtype=arrays[0].dtype)
        elif kind == "x1000":
            arrays = [a * 1000 for a in arrays]
        reply.content["arrays"] = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in zip(keys, arrays)})
        return reply
    return t


@pytest.mark.parametrize("kind", ["nan", "shape", "x1000"])
def test_bad_reply_excluded_and_global_model_unaffected(tmp_path, kind):
    nodes = _nodes(tmp_path)
    cfg = _cfg(tmp_path, **{"num-rounds": 1, "max-update-norm": 50.0})
    res = run_federation(InProcessGrid(client_app, nodes, tamper=_tamper(kind)), cfg, run_id="r")
    assert [x["node"] for x in res["excluded"]] == [2]
    # reference: same run without node 2's reply
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    nodes2 = _nodes(clean_dir)
    ref = run_federation(InProcessGrid(client_app, nodes2, tamper=lambda n, r: _drop_marker(n, r)),
                         _cfg(clean_dir, **{"num-rounds": 1, "max-update-norm": 50.0}), run_id="r")
    a = load_file(tmp_path / "run" / "model.safetensors")
    b = load_file(clean_dir / "run" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k]) for k in a)


def _drop_marker(node, reply):
    if node == 2:  # make node 2's reply invalid in a different way: excluded the same
        reply.content["arrays"] = ArrayRecord({})
    return reply


def test_budget_refusal_run_continues_with_others(tmp_path):
    nodes = _nodes(tmp_path, eps=(8.0, 8.0, 8.0, 1.0))  # Switzerland's budget is too small for this job
    res = run_federation(InProcessGrid(client_app, nodes), _cfg(tmp_path, **{"num-rounds": 2}), run_id="r")
    refused = {r["node"] for r in res["refused"]}
    assert refused == {4}
    assert all("max_epsilon" in r["reason"] for r in res["refused"])
    assert all(e["train"]["accepted"] == 3 for e in res["rounds"])
    assert PrivacyLedger(nodes[3]["ledger"]).releases("Switzerland") == []


def test_coordinator_killed_after_round_k_resumes_at_k_plus_1(tmp_path):
    nodes = _nodes(tmp_path)
    grid = InProcessGrid(client_app, nodes)
    # "kill" after round 2: the first process only gets through 2 rounds of a 3-round run
    run_federation(grid, _cfg(tmp_path, **{"num-rounds": 2}), run_id="r1")
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert ck["round"] == 2
    delta = _released_delta(nodes[0])
    eps_before = PrivacyLedger(nodes[0]["ledger"]).epsilon("Cleveland", delta)
    res = run_federation(InProcessGrid(client_app, nodes), _cfg(tmp_path, **{"num-rounds": 3, "resume": True}), run_id="r2")
    assert [e["round"] for e in res["rounds"]] == [1, 2, 3]
    assert res["run_id"] == "r1"  # the resumed run keeps its identity (ledger rows too)
    assert [(r["flower-run-id"], r["after-round"]) for r in res["resumes"]] == [("r2", 2)]  # and says so
    led = PrivacyLedger(nodes[0]["ledger"])
    # the training count is released once (round 1) and the resumed round 3 reuses it: no second count row
    assert [(r["mechanism"], r["run_id"], r["round"]) for r in led.releases("Cleveland")] == \
        [("gaussian-count", "r1", 1), ("dp-sgd", "r1", 1), ("dp-sgd", "r1", 2), ("dp-sgd", "r1", 3)]
    assert _released_delta(nodes[0]) == delta
    assert led.epsilon("Cleveland", delta) > eps_before  # continues, does not reset


class _Crash(RuntimeError):
    """The coordinator process dies (raised from inside a round)."""


def test_crash_mid_round_then_resume_replays_the_round_and_keeps_the_target(tmp_path):
    """Every node trained round 3, the coordinator died before aggregating it: the resume asks again.

    The replayed round is counted again (conservative) and marked as a replay; each node pays for
    it with more noise in what is left of the run, so no node passes target-epsilon.
    """
    from privacy.dp import rdp_epsilon

    nodes = _nodes(tmp_path)
    replies = {"n": 0}

    def crash_in_round_3(node, reply):
        replies["n"] += 1
        if replies["n"] == 3 * 4:  # the 4th node's round-3 update: all four have trained and released it
            raise _Crash("coordinator killed mid-round")
        return reply

    cfg = _cfg(tmp_path, **{"num-rounds": 4})
    with pytest.raises(_Crash):
        run_federation(InProcessGrid(client_app, nodes, tamper=crash_in_round_3), cfg, run_id="r1")
    assert load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["round"] == 2
    res = run_federation(InProcessGrid(client_app, nodes), {**cfg, "resume": True}, run_id="r2")
    assert [e["round"] for e in res["rounds"]] == [1, 2, 3, 4] and res["run_id"] == "r1"
    for n in nodes:
        led = PrivacyLedger(n["ledger"])
        rows = led.releases(n["site"])
        # the count release (once, round 1, never replayed) precedes the dp-sgd rounds
        assert [(r["mechanism"], r["round"], r["replay"]) for r in rows] == \
            [("gaussian-count", 1, 0)] + [("dp-sgd", k, p) for k, p in [(1, 0), (2, 0), (3, 0), (3, 1), (4, 0)]]
        eps = rdp_epsilon(led.run_history(n["site"], "r1"), _released_delta(n))  # the count release included
        assert 2.9 < eps <= 3.0 + 1e-9, n["site"]  # the target, with the replay counted

@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimiser_strategies_keep_the_model_dtype_and_accept_every_round(tmp_path, strategy):
    """FedAdam/FedYogi returned a float64 global model: from round 2 on every float32 node reply was excluded."""
    nodes = _nodes(tmp_path)
    res = run_federation(InProcessGrid(client_app, nodes), _cfg(tmp_path, strategy=strategy), run_id="r1")
    assert res["excluded"] == [] and [e["round"] for e in res["rounds"]] == [1, 2, 3]
    assert all(e["train"]["accepted"] == 4 for e in res["rounds"])
    model = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert {str(t.dtype) for t in model.values()} == {"torch.float32"}
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert {a.dtype for a in ckpt["arrays"].values()} == {np.dtype("float32")}


def test_fedadam_resumed_from_its_checkpoint_continues_with_the_saved_moments(tmp_path, monkeypatch):
    """The checkpoint carries FedAdam's moments under cityfed's names (state_dict); a resume starts from them."""
    from server.strategy import OPTIMISER_KEY, CityFedAdam

    nodes = _nodes(tmp_path)
    run_federation(InProcessGrid(client_app, nodes), _cfg(tmp_path, strategy="fedadam", **{"num-rounds": 2}), run_id="r1")
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["strategy_state"]
    assert set(saved) == {OPTIMISER_KEY}
    moments = saved[OPTIMISER_KEY]
    assert set(moments) == {"model", "first-moment", "second-moment"}  # no Flower attribute names
    assert any(np.abs(v).sum() > 0 for v in moments["first-moment"].values())

    seen = []
    flower_aggregate = CityFedAdam.aggregate_train

    def spy(self, server_round, replies):
        seen.append((server_round, {k: {n: np.array(a) for n, a in v.items()} for k, v in self.state_dict().items()
                                    if k != "model"}))
        return flower_aggregate(self, server_round, replies)

    monkeypatch.setattr(CityFedAdam, "aggregate_train", spy)
    res = run_federation(InProcessGrid(client_app, nodes),
                         _cfg(tmp_path, strategy="fedadam", **{"num-rounds": 3, "resume": True}), run_id="r2")
    assert [e["round"] for e in res["rounds"]] == [1, 2, 3] and res["excluded"] == []
    assert [rnd for rnd, _ in seen] == [3]
    at_round_3 = seen[0][1]
    for key in ("first-moment", "second-moment"):  # round 3 steps from the saved moments, not from zero
        assert set(at_round_3[key]) == set(moments[key])
        for name, value in moments[key].items():
            np.testing.assert_array_equal(at_round_3[key][name], value)
    after = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["strategy_state"][OPTIMISER_KEY]
    beta_1 = CityFedAdam().beta_1  # m_3 = beta_1 m_2 + (1 - beta_1) delta_3: the saved moment decays into the new one
    name = next(iter(moments["first-moment"]))
    delta_3 = (after["first-moment"][name] - beta_1 * moments["first-moment"][name]) / (1 - beta_1)
    fresh = (1 - beta_1) * delta_3  # what round 3 would have left without the saved moment
    assert not np.allclose(after["first-moment"][name], fresh)
