"""Central DP (run config ``central-dp``): Flower's DP wrapper, node-side clipping, accountant in the checkpoint."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from clients.app import build_client_app
from flower_compat.dp import KEY_CLIPPING_NORM
from flower_compat.inprocess import set_task_identity
from privacy.ledger import PrivacyLedger
from server.app import run_federation, settings
from server.central_dp import STATE_KEY, CentralAccountant, CentralDPFixedClipping
from server.strategy import load_checkpoint
from simulations.inprocess import InProcessGrid

warnings.filterwarnings("ignore", category=UserWarning)
from fed_helpers import POLICY, health_nodes, released_delta, site_delta  # noqa: E402


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages built outside a grid need Flower's task identity (as the in-process grid sets it)."""
    set_task_identity(1, 0, 1)


def _reply(arrays: dict, n: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n})})
    return Message(content, dst_node_id=0, message_type="train")


# -- the coordinator's wrapper ----------------------------------------------------------------------------------
def test_noise_added_with_expected_std_on_the_unweighted_mean():
    rng = np.random.default_rng(0)
    d, k, z, c = 40_000, 4, 2.0, 1.0
    updates = []
    for _ in range(k):  # each node's update has norm exactly c (clipped on the node)
        u = rng.normal(size=d).astype(np.float64)
        updates.append(u * (c / np.linalg.norm(u)))
    weights = [10, 100, 1000, 5]  # very different record counts: central DP must not weigh by them
    from server.strategy import make_strategy

    wrapper = CentralDPFixedClipping(make_strategy("fedavg"), noise_multiplier=z, clipping_norm=c, delta=1e-5)
    agg, metrics = wrapper.aggregate_train(1, [_reply({"w": u}, n) for u, n in zip(updates, weights)])
    out = agg["w"].numpy()
    plain = np.mean(updates, axis=0)  # unweighted
    resid = out - plain
    expected = z * c / k
    assert abs(resid.std() / expected - 1) < 0.02  # ~0.35 % standard error at d = 40,000
    assert abs(resid.mean()) < 5 * expected / math.sqrt(d)
    # the mean is unweighted (one node moves it by at most C/k whatever its record count): seen with tiny noise
    quiet = CentralDPFixedClipping(FedAvg(), noise_multiplier=1e-9, clipping_norm=c, delta=1e-5)
    q_out = quiet.aggregate_train(1, [_reply({"w": u}, n) for u, n in zip(updates, weights)])[0]["w"].numpy()
    assert np.allclose(q_out, plain, atol=1e-7)
    assert not np.allclose(q_out, np.average(updates, axis=0, weights=weights), atol=1e-4)
    assert metrics["num-examples"] == sum(weights)  # the total is still reported
    assert wrapper.last["noise-std"] == pytest.approx(expected) and wrapper.last["contributors"] == k
    assert wrapper.central.rounds == 1 and wrapper.last["epsilon"] > 0


def _configured(wrapper, rnd: int, n: int, d: int = 8):
    """Configure round ``rnd`` of ``wrapper`` for ``n`` nodes at global model 0 of ``d`` weights (a real round's first step)."""
    from flwr.app import ArrayRecord, ConfigRecord

    class _Grid:
        def get_node_ids(self):
            return list(range(1, n + 1))

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    wrapper.strategy.min_train_nodes = wrapper.strategy.min_available_nodes = 1
    return list(wrapper.configure_train(rnd, ArrayRecord({"w": torch.zeros(d, dtype=torch.float64)}), ConfigRecord({}),
                                        _Grid()))


def test_one_node_moves_the_published_aggregate_by_at_most_c_over_the_nodes_asked():
    """Independent privacy audit (2026-12-07, M1) and its review: the mean over the k updates that arrived
    let one node move it by 2C/k (not the C/k accounted), and its noise std z C / k told how many arrived.
    Now the sum is divided by the W nodes asked (McMahan et al. 2018's fixed denominator): one node's update
    present or absent moves the aggregate by at most C / W, and the noise is z C / W whoever replied."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    from server.strategy import make_strategy

    w, z, c = 4, 1.0, 1.0
    u = np.zeros(8)
    u[0] = c
    out = {}
    for name, replies in (("absent", [u] * (w - 1)), ("present", [u] * (w - 1) + [-u])):
        quiet = CentralDPFixedClipping(make_strategy("fedavg"), noise_multiplier=1e-9, clipping_norm=c, delta=1e-5)
        assert len(_configured(quiet, 1, w)) == w
        out[name] = quiet.aggregate_train(1, [_reply({"w": r}, 1) for r in replies])[0]["w"].numpy()
    move = float(np.linalg.norm(out["present"] - out["absent"]))
    assert move == pytest.approx(c / w, rel=1e-6)
    stds = []
    for arrived in (w - 1, w):
        wrapper = CentralDPFixedClipping(make_strategy("fedavg"), noise_multiplier=z, clipping_norm=c, delta=1e-5)
        _configured(wrapper, 1, w)
        wrapper.aggregate_train(1, [_reply({"w": u}, 1) for _ in range(arrived)])
        stds.append(wrapper.last["noise-std"])
        rdp = rdp_privacy_accountant.RdpAccountant()
        rdp.compose(dp_event.GaussianDpEvent(wrapper.last["noise-std"] / move), 1)
        assert wrapper.last["epsilon"] >= rdp.get_epsilon(1e-5) * 0.99  # never below the mechanism's
        assert wrapper.last["epsilon"] == pytest.approx(rdp.get_epsilon(1e-5), rel=0.01)
        assert wrapper.last["nodes-asked"] == w and wrapper.last["contributors"] == arrived
    assert stds == [pytest.approx(z * c / w)] * 2  # the same noise whether 3 or 4 arrived


def test_published_noise_does_not_tell_how_many_nodes_arrived():
    """The review's attack: with std z C / k the published aggregate's spread over many coordinates told
    3 contributors from 4. With the fixed denominator the residual spread is the same either way."""
    from server.strategy import make_strategy

    w, d = 4, 40_000
    spread = {}
    for arrived in (w - 1, w):
        wrapper = CentralDPFixedClipping(make_strategy("fedavg"), noise_multiplier=4.0, clipping_norm=1.0, delta=1e-5)
        _configured(wrapper, 1, w, d)
        zero = np.zeros(d)
        agg = wrapper.aggregate_train(1, [_reply({"w": zero}, 1) for _ in range(arrived)])[0]["w"].numpy()
        spread[arrived] = agg.std()
    assert spread[w - 1] == pytest.approx(spread[w], rel=0.03)  # ~0.35 % standard error each at d = 40,000


def test_a_checkpoint_of_the_mean_over_arrivals_is_re_read_at_half_its_noise():
    """Rounds accounted before the fixed denominator (a state without 'version') averaged over the updates that
    arrived: their sensitivity was 2C/k, so a resume composes them at z / 2 (never under-counts them)."""
    old = {"delta": 1e-5, "accountant": "rdp", "history": [[1.0, 1.0, 2]], "rounds": 2, "epsilon": 7.08}
    acc = CentralAccountant.from_state(old, delta=1e-5)
    assert acc.epsilon() == pytest.approx(CentralAccountant(1e-5, history=[(0.5, 1.0, 2)]).epsilon())
    assert acc.epsilon() > 16.0
    again = CentralAccountant.from_state(json.loads(json.dumps(acc.state())), delta=1e-5)
    assert again.epsilon() == pytest.approx(acc.epsilon())  # a new state is not halved twice


def test_secagg_mean_gets_noise_for_its_contributors():
    """SecAgg+ hands over one reply (the mean of k updates): the noise is z*C/k, not z*C/1."""
    d, k, z, c = 40_000, 5, 1.0, 0.5
    mean = np.zeros(d)
    wrapper = CentralDPFixedClipping(FedAvg(), noise_multiplier=z, clipping_norm=c, delta=1e-5)
    agg, _ = wrapper.aggregate_train(3, [_reply({"w": mean}, 1)], contributors=k)
    assert abs(agg["w"].numpy().std() / (z * c / k) - 1) < 0.02


def test_only_mean_strategies_accepted():
    from server.strategy import make_strategy

    with pytest.raises(ValueError, match="FedAvg.aggregate_train"):
        CentralDPFixedClipping(make_strategy("fedadam"), noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5)
    with pytest.raises(ValueError, match="'central-dp'"):
        settings({"department": "health", "strategy": "krum", "central-dp": True})
    with pytest.raises(ValueError, match="central-noise-multiplier"):
        settings({"department": "health", "central-dp": True, "central-noise-multiplier": 0})
    cfg = settings({"department": "health", "central-dp": True})
    assert cfg["central-clipping-norm"] == 1.0 and cfg["central-delta"] == 1e-5


@pytest.mark.parametrize("z,c", [(math.inf, 1.0), (math.nan, 1.0), (0.0, 1.0), (1.0, math.nan), (1.0, math.inf),
                                 (1.0, 0.0), (1.0, -0.1)])
def test_the_wrapper_refuses_unusable_noise_and_norms_itself(z, c):
    """The public wrapper checks its own parameters (review s18, LOW): with C = NaN the coordinator's bound
    min(max-update-norm, C * slack) was max-update-norm (no norm check), and z = inf passed `> 0`."""
    from server.strategy import make_strategy

    with pytest.raises(ValueError, match="finite and > 0"):
        CentralDPFixedClipping(make_strategy("fedavg"), noise_multiplier=z, clipping_norm=c, delta=1e-5)


# -- the accountant -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("z,q,rounds,delta", [(1.0, 1.0, 5, 1e-5), (1.1, 0.5, 10, 1e-5), (0.8, 0.25, 30, 1e-6)])
def test_accountant_matches_independent_accountants(z, q, rounds, delta):
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_event.GaussianDpEvent(z) if q == 1 else dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event, rounds)
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(event, rounds)
    acc = CentralAccountant(delta, "rdp")
    for _ in range(rounds):
        acc.step(z, q)
    assert acc.rounds == rounds
    assert acc.epsilon() == pytest.approx(rdp.get_epsilon(delta), rel=0.01)  # dp-accounting's RDP (other orders)
    prv = CentralAccountant(delta, "prv", acc.history).epsilon()
    assert pld.get_epsilon(delta) * 0.99 <= prv <= acc.epsilon()  # PRV: tighter than RDP, never below PLD - 1 %


def test_accountant_state_is_json_and_continues():
    acc = CentralAccountant(1e-5)
    for _ in range(3):
        acc.step(1.2, 1.0)
    state = json.loads(json.dumps(acc.state()))  # plain JSON types only
    again = CentralAccountant.from_state(state, delta=1e-5)
    assert again.epsilon() == acc.epsilon() and again.rounds == 3
    again.step(1.2, 1.0)
    fresh = CentralAccountant(1e-5, history=[(1.2, 1.0, 4)])
    assert again.epsilon() == pytest.approx(fresh.epsilon())
    assert again.epsilon() > acc.epsilon()


# -- the node ---------------------------------------------------------------------------------------------------
def _node(tmp_path, cap: float | None = None, require_dp: bool = True):
    pol = tmp_path / "Cleveland.toml"
    text = POLICY.format(eps=50.0)
    if not require_dp:
        text = text.replace("require_dp = true", "require_dp = false")
    if cap is not None:
        text += f"central_max_clipping_norm = {cap}\n"
    pol.write_text(text)
    return {"department": "health", "site": "Cleveland", "policy": str(pol), "ledger": str(tmp_path / "Cleveland.sqlite")}


def _train_once(tmp_path, node, asked, dp=True, run_id="run-x"):
    """Send one train message (as the coordinator's DP wrapper does) to the real ClientApp; (global, reply)."""
    from shared_models import build_model, default_model_config

    from citydata import DATASETS

    torch.manual_seed(0)
    model = build_model(default_model_config(DATASETS["health"].schema, "heart-mlp"))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    job = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": run_id, "server-round": 1,
           "local-epochs": 1, "batch-size": 32, "lr": 0.05, "dp": dp, "clipping-norm": 1.0, "noise-multiplier": 1.0,
           "num-rounds": 1, "seed": 0}
    if asked is not None:
        job.update({KEY_CLIPPING_NORM: asked, "central-noise-multiplier": 1.0, "central-delta": 1e-5,
                    "central-epsilon-claimed": 4.73, "central-accountant": "rdp", "central-sample-rate": 1.0})
    grid = InProcessGrid(build_client_app(), [node])
    msg = grid.create_message(RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(job)}), "train", 1, "1")
    reply = list(grid.send_and_receive([msg]))[0]
    return state, reply


def _update_norm(state, reply) -> float:
    new = reply.content["arrays"].to_torch_state_dict()
    return math.sqrt(sum(float(((new[k].double() - state[k].double()) ** 2).sum()) for k in state))


def test_node_clips_at_the_coordinators_norm_and_records_a_claim(tmp_path):
    node = _node(tmp_path)
    state, free = _train_once(tmp_path, node, None, run_id="plain")  # no central DP: the update is not clipped
    unclipped = _update_norm(state, free)
    assert unclipped > 0.1
    state, reply = _train_once(tmp_path, node, 0.05)
    assert not reply.has_error()
    assert _update_norm(state, reply) == pytest.approx(0.05, rel=1e-4)
    led = PrivacyLedger(node["ledger"])
    claims = led.central_claims("Cleveland")
    assert [(c["run_id"], c["round"], c["clipping_norm_asked"], c["clipping_norm_applied"]) for c in claims] == \
        [("run-x", 1, 0.05, 0.05)]
    assert claims[0]["claimed_epsilon"] == 4.73 and claims[0]["claimed_delta"] == 1e-5
    # the claim is not the node's guarantee: its epsilon is its own releases alone (its DP-SGD rows and,
    # since the count release, the one noised training count the first run asked for)
    own_only = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in led.releases("Cleveland")]
    assert [(r["mechanism"], r["run_id"]) for r in led.releases("Cleveland")] == \
        [("gaussian-count", "plain"), ("dp-sgd", "plain"), ("dp-sgd", "run-x")]
    from privacy.accounting import epsilon

    d = site_delta("Cleveland")
    assert led.epsilon("Cleveland", d) == pytest.approx(epsilon(own_only, d))


def test_node_never_clips_looser_than_its_policy(tmp_path):
    node = {**_node(tmp_path, cap=0.02), "audit-log": str(tmp_path / "audit.jsonl")}
    state, reply = _train_once(tmp_path, node, 1.0)  # the coordinator asks for 50x the node's cap
    assert not reply.has_error()
    assert _update_norm(state, reply) == pytest.approx(0.02, rel=1e-4)
    c = PrivacyLedger(node["ledger"]).central_claims("Cleveland")[0]
    assert (c["clipping_norm_asked"], c["clipping_norm_applied"]) == (1.0, 0.02)
    from privacy.audit import AuditLog

    (entry,) = [e for e in AuditLog(tmp_path / "audit.jsonl").entries() if e["kind"] == "central-dp"]
    assert entry["data"]["clipping_norm_applied"] == 0.02 and entry["data"]["claimed_epsilon"] == 4.73
    assert "claimed" in entry["data"]["note"]
    state, reply = _train_once(tmp_path, node, 0.01, run_id="run-y")  # tighter than the cap: the coordinator's
    assert _update_norm(state, reply) == pytest.approx(0.01, rel=1e-4)


def test_node_refuses_an_unusable_norm_and_still_requires_its_own_dp(tmp_path):
    node = _node(tmp_path)
    _, reply = _train_once(tmp_path, node, -1.0)
    assert reply.has_error() and "clipping norm" in reply.error.reason
    _, reply = _train_once(tmp_path, node, 0.5, dp=False)  # central DP does not replace the node's DP-SGD
    assert reply.has_error() and "require_dp" in reply.error.reason
    assert PrivacyLedger(node["ledger"]).central_claims() == []


# -- end to end -------------------------------------------------------------------------------------------------
def _cfg(tmp_path, **kw):
    cfg = {"department": "health", "num-rounds": 1, "local-epochs": 1, "batch-size": 64, "lr": 0.02,
           "target-epsilon": 3.0, "run-dir": str(tmp_path / "run"), "min-nodes": 1, "central-dp": True,
           "central-noise-multiplier": 1.0, "central-clipping-norm": 0.1, "central-delta": 1e-5}
    cfg.update(kw)
    return cfg


@pytest.mark.slow
def test_federation_with_central_dp_resumes_its_accountant(tmp_path):
    """fl-sim's in-process federation (4 hospitals) with central DP: 1 round, then resumed to 2: epsilon continues."""
    from simulations.run import default_policy, simulate

    res1 = simulate(_cfg(tmp_path, **{"run-id": "r1"}), engine="inprocess")
    c1 = res1["rounds"][0]["train"]["central-dp"]
    one = CentralAccountant(1e-5, history=[(1.0, 1.0, 1)]).epsilon()
    assert c1["contributors"] == 4 and c1["noise-std"] == pytest.approx(1.0 * 0.1 / 4)
    assert c1["epsilon"] == pytest.approx(one) and res1["central-dp"]["rounds"] == 1
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert ck["strategy_state"][STATE_KEY]["history"] == [[1.0, 1.0, 1]]
    before = {k: v.copy() for k, v in ck["arrays"].items()}

    res2 = simulate(_cfg(tmp_path, **{"num-rounds": 2, "resume": True, "run-id": "r2"}), engine="inprocess")
    two = CentralAccountant(1e-5, history=[(1.0, 1.0, 2)]).epsilon()
    assert [e["round"] for e in res2["rounds"]] == [1, 2] and res2["run_id"] == "r1"
    assert two > one
    assert res2["rounds"][1]["train"]["central-dp"]["epsilon"] == pytest.approx(two)  # continued, not restarted
    assert res2["central-dp"]["rounds"] == 2 and res2["central-dp"]["epsilon"] == pytest.approx(two)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["central-dp"]["epsilon"] == pytest.approx(two)
    # round 2 moved the model by the clipped unweighted mean (norm <= 0.1) plus noise of std 0.1/4 per weight
    after = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["arrays"]
    diff = np.concatenate([(after[k].astype(np.float64) - before[k]).ravel() for k in before])
    assert 0.9 * 0.1 / 4 < diff.std() < 1.1 * 0.1 / 4 + 0.1 / math.sqrt(diff.size)
    ledgers = sorted((tmp_path / "run" / "ledgers").glob("*.sqlite"))
    assert len(ledgers) == 4
    for path in ledgers:  # every node: its own DP-SGD within the target, the central rounds recorded as claims
        led = PrivacyLedger(path)
        site = path.stem.split("-", 1)[1]
        # at the delta the node accounts at: that of its released (noised) count, not of the exact one
        assert led.epsilon(site, released_delta(path, site, default_policy("health"))) <= 3.0 + 1e-6
        claims = led.central_claims(site)
        assert [c["round"] for c in claims] == [1, 2] and {c["run_id"] for c in claims} == {"r1"}
        assert [c["claimed_epsilon"] for c in claims] == pytest.approx([one, two])
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Central DP (coordinator)" in html and f"{two:.3f}" in html


def test_unclipped_update_is_excluded_by_the_coordinator(tmp_path):
    """A node that does not clip (older code, a fault) is excluded: its update would void the noise's calibration."""

    def unclip(node, reply):  # node 2's update multiplied by 10 after its clip: norm 10 x C
        if node != 2:
            return reply
        new, ref = reply.content["arrays"].to_torch_state_dict(), grid_state["global"]
        reply.content["arrays"] = ArrayRecord({k: ref[k] + 10 * (new[k] - ref[k]) for k in new})
        return reply

    from shared_models import build_model, default_model_config

    from citydata import DATASETS

    torch.manual_seed(0)  # the run's initial model (seed 0), the global model of round 1
    grid_state = {"global": build_model(default_model_config(DATASETS["health"].schema, "heart-mlp")).state_dict()}
    nodes = health_nodes(tmp_path, eps=(8.0, 8.0, 8.0))
    res = run_federation(InProcessGrid(build_client_app(), nodes, tamper=unclip), _cfg(tmp_path), run_id="r")
    assert [x["node"] for x in res["excluded"]] == [2] and "exceeds the bound 0.1" in res["excluded"][0]["reason"]
    c = res["rounds"][0]["train"]["central-dp"]
    # the excluded node counts as absent: the sum of the 2 others over the 3 nodes asked, noise z C / 3
    assert c["contributors"] == 2 and c["nodes-asked"] == 3 and c["noise-std"] == pytest.approx(0.1 / 3)


def test_central_dp_composes_with_secagg(tmp_path):
    """SecAgg+ and central DP: nodes clip before masking with equal weights, the coordinator noises the unmasked mean."""
    nodes = health_nodes(tmp_path, eps=(8.0, 8.0, 8.0))
    res = run_federation(InProcessGrid(build_client_app(), nodes), _cfg(tmp_path, secagg=True), run_id="sa")
    train = res["rounds"][0]["train"]
    assert train["secagg"]["sampled"] == 3 and train["accepted"] == 3
    c = train["central-dp"]
    assert c["contributors"] == 3 and c["noise-std"] == pytest.approx(0.1 / 3)
    # the unmasked mean of 3 updates clipped to 0.1 (unweighted), before the noise
    assert train["aggregate"]["aggregate-update-norm"] <= 0.1 * 1.001
    for n in nodes:
        claims = PrivacyLedger(n["ledger"]).central_claims(n["site"])
        assert [(c["round"], c["clipping_norm_applied"]) for c in claims] == [(1, 0.1)]


def test_report_shows_central_dp_as_its_own_mechanism():
    from server.report import central_dp_table, section_summary

    assert central_dp_table({"config": {"central-dp": False}}) == ""
    results = {"config": {"central-dp": True, "central-noise-multiplier": 1.0, "central-clipping-norm": 0.1,
                          "central-delta": 1e-5},
               "rounds": [{"round": 1, "train": {"central-dp": {"epsilon": 4.7285, "delta": 1e-5, "noise-multiplier": 1.0,
                                                                "clipping-norm": 0.1, "noise-std": 0.025,
                                                                "sample-rate": 1.0, "contributors": 4}}},
                          {"round": 2, "train": {"accepted": 0}}],
               "central-dp": {"epsilon": 4.7285, "rounds": 1, "accountant": "rdp"}}
    html = central_dp_table(results)
    assert "Central DP (coordinator)" in html and "4.729" in html and "0.0250" in html and "1.00e-05" in html
    assert html.count("<tr>") == 2  # header + the one aggregated round
    assert "claim" in html and "not a node" in html
    summary = section_summary(results, {})
    assert "central DP (published model)" in summary and "4.729 after 1 round(s)" in summary


def test_sampling_rate_is_never_below_what_fedavg_samples():
    from types import SimpleNamespace

    from server.strategy import make_strategy

    def grid(n):
        return SimpleNamespace(get_node_ids=lambda: list(range(1, n + 1)))

    def wrapper(fraction, min_nodes):
        return CentralDPFixedClipping(make_strategy("fedavg", fraction_train=fraction, min_nodes=min_nodes),
                                      noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5, sample_rate=fraction)

    assert wrapper(0.5, 1).round_sample_rate(grid(10)) == 0.5
    assert wrapper(0.5, 3).round_sample_rate(grid(4)) == 0.75  # FedAvg samples max(int(4 * 0.5), 3) = 3 of 4
    assert wrapper(1.0, 1).round_sample_rate(grid(4)) == 1.0
    w = wrapper(0.5, 1)
    assert w.min_train_nodes == 1 and w.fraction_train == 0.5  # read through the wrapper (the run loop does)
    w.min_train_nodes = 3  # SecAgg+ raises it through the wrapper: the wrapped FedAvg gets it
    assert w.strategy.min_train_nodes == 3
