"""On-site personalisation (issue 12.1): policy, ledger, joint calibration, what leaves the node, end to end."""

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.app import REFUSED, app
from citydata import load_department
from clients.node import JobRefused, job_from_config, node_from_config, public_count
from clients.personalise import handle_personalise, head_prefix, load_personalised, personalised_path
from clients.training import TrainConfig, fit
from contract.tasks import PERSONALISE_METRICS
from flower_compat.inprocess import set_task_identity
from privacy.ledger import PrivacyLedger
from privacy.policy import PolicyError, parse_policy
from shared_models import build_model, criterion_for, default_model_config

warnings.filterwarnings("ignore", category=UserWarning)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

POLICY = """
department = "health"
max_epsilon = {max_eps}
min_noise_multiplier = 0.5
max_clipping_norm = 1.0
allowed_tasks = ["heart-disease"]
max_rounds_per_run = 10
require_dp = {require_dp}
personalisation = {on}
"""
SITE = "Cleveland"


@pytest.fixture(autouse=True)
def _identity():
    set_task_identity(7, 0, 1)
    torch.set_num_threads(1)
    yield


def _spec(tmp_path, on=True, max_eps=8.0, require_dp=True):
    pol = tmp_path / "policy.toml"
    pol.write_text(POLICY.format(max_eps=max_eps, on=str(on).lower(), require_dp=str(require_dp).lower()))
    node_config = {"department": "health", "site": SITE, "policy": str(pol), "ledger": str(tmp_path / "ledger.sqlite")}
    return node_config, node_from_config(node_config, {})


def _cfg(**over):
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": "r1", "server-round": 3,
           "num-rounds": 3, "local-epochs": 1, "batch-size": 32, "lr": 0.01, "dp": True, "target-epsilon": 3.0,
           "clipping-norm": 1.0, "personalise-epochs": 4, "personalise-lr": 0.01, "personalise-layers": "all"}
    cfg.update(over)
    return cfg


def _released(spec, site=SITE):
    """The site's released (noised, once-accounted) training count: what the node's steps and delta follow."""
    return PrivacyLedger(spec.ledger_path).counts(site, split="train")[0]["value"]


def _global_state():
    torch.manual_seed(0)
    return build_model(default_model_config(load_department("health").schema)).state_dict()


def test_policy_field_is_strict_and_defaults_off():
    base = POLICY.replace("personalisation = {on}\n", "").format(max_eps=8.0, require_dp="true")
    assert parse_policy(base).personalisation is False
    assert parse_policy(base + "personalisation = true\n").personalisation is True
    with pytest.raises(PolicyError, match="personalisation"):
        parse_policy(base + 'personalisation = "yes"\n')


def test_rounds_reserve_personalisation_steps(tmp_path):
    """A run that ends with personalisation calibrates its rounds with more noise (the target covers both)."""
    _, spec = _spec(tmp_path)
    n = len(spec.site_data()[1].train)
    with_p = job_from_config(_cfg(**{"server-round": 1}), spec, n)
    without = job_from_config(_cfg(**{"server-round": 1, "personalise-epochs": 0}), spec, n)
    assert with_p.noise_multiplier > without.noise_multiplier
    (tmp_path / "off").mkdir()
    _, off = _spec(tmp_path / "off", on=False)
    refused = job_from_config(_cfg(**{"server-round": 1}), off, n)  # policy off: nothing reserved
    assert refused.noise_multiplier == pytest.approx(without.noise_multiplier)


def test_personalisation_is_a_ledger_release_within_target(tmp_path):
    """Rounds + personalisation land on the run's target; the release is in the ledger; the model stays here."""
    from clients.node import handle_train

    _, spec = _spec(tmp_path)
    state = _global_state()
    for rnd in (1, 2, 3):
        state, _ = handle_train(state, _cfg(**{"server-round": rnd}), spec)
    ledger = PrivacyLedger(spec.ledger_path)
    delta = public_count(_released(spec), spec.policy)[1]  # the node's delta follows its released count
    before = ledger.run_epsilon(SITE, "r1", delta)
    assert before < 2.9  # the rounds left budget for the personalisation
    metrics = handle_personalise(state, _cfg(), spec)
    assert set(metrics) <= set(PERSONALISE_METRICS)
    rows = ledger.releases(SITE)
    # the count release (once, by round 1, in the run's history) comes first
    assert [r["mechanism"] for r in rows] == ["gaussian-count"] + ["dp-sgd"] * 3 + ["personalisation"]
    assert rows[0]["run_id"] == "r1" and rows[0]["round"] == 1 and rows[0]["status"] == "committed"
    assert rows[-1]["noise_multiplier"] == pytest.approx(rows[1]["noise_multiplier"], rel=0.01)  # ~one noise for the run
    after = ledger.run_epsilon(SITE, "r1", delta)
    assert 2.97 <= after <= 3.0 + 1e-9
    assert metrics["epsilon"] == pytest.approx(after) and after <= spec.policy.max_epsilon
    path = personalised_path(spec, "r1")
    kept = load_personalised(path)  # safetensors, not pickle
    assert path.read_bytes()[8:9] == b"{"  # safetensors header
    assert any(not torch.equal(kept[k], state[k]) for k in state)
    # once per run: a second personalisation of the same run (e.g. a resumed run) is refused
    with pytest.raises(JobRefused, match="already personalised"):
        handle_personalise(state, _cfg(), spec)
    assert len(ledger.releases(SITE)) == 5  # count + 3 rounds + personalisation; the count is not released again
    assert len(ledger.counts(SITE)) == 1


@pytest.mark.parametrize("pbatch", [16, 64])
def test_personalisation_batch_size_is_accounted_at_its_own_sample_rate(tmp_path, pbatch):
    """personalise-batch-size: the release is recorded at that batch's sample rate and steps, and the run
    still lands on its target (the personalisation is calibrated on what the ledger holds)."""
    from clients.node import handle_train

    _, spec = _spec(tmp_path)
    n = len(spec.site_data()[1].train)
    cfg = _cfg(**{"personalise-batch-size": pbatch})
    state = _global_state()
    for rnd in (1, 2, 3):
        state, _ = handle_train(state, {**cfg, "server-round": rnd}, spec)
    metrics = handle_personalise(state, cfg, spec)
    rows = PrivacyLedger(spec.ledger_path).releases(SITE)
    # steps, sample rates and delta follow the released (noised) count, not the exact n
    released = _released(spec)
    assert PrivacyLedger(spec.ledger_path).counts(SITE, split="train")[0]["exact"] == n
    public, delta = public_count(released, spec.policy)
    per_epoch = math.ceil(public / pbatch)
    assert [r["mechanism"] for r in rows] == ["gaussian-count"] + ["dp-sgd"] * 3 + ["personalisation"]
    assert rows[-1]["sample_rate"] == pytest.approx(1 / per_epoch) and rows[-1]["steps"] == 4 * per_epoch
    assert all(r["sample_rate"] == pytest.approx(1 / math.ceil(public / 32)) for r in rows[1:4])  # the rounds keep the run's batch
    assert metrics["steps"] == 4 * per_epoch
    after = PrivacyLedger(spec.ledger_path).run_epsilon(SITE, "r1", delta)
    assert 2.9 <= after <= 3.0 + 1e-9


def test_lifetime_budget_refuses(tmp_path):
    _, spec = _spec(tmp_path, max_eps=0.5)
    with pytest.raises(JobRefused, match="max_epsilon"):
        handle_personalise(_global_state(), _cfg(), spec)
    assert PrivacyLedger(spec.ledger_path).releases(SITE) == []
    assert not personalised_path(spec, "r1").exists()


def _message(cfg):
    content = RecordDict({"arrays": ArrayRecord(_global_state()), "config": ConfigRecord(cfg)})
    return Message(content=content, dst_node_id=1, message_type="train.personalise")


def test_clientapp_reply_carries_no_model(tmp_path):
    node_config, spec = _spec(tmp_path)
    ctx = Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    reply = app(_message(_cfg(**{"server-round": 1, "num-rounds": 1})), ctx)
    assert not reply.has_error()
    assert list(reply.content.keys()) == ["metrics"]  # no arrays: the personalised model never leaves
    assert set(reply.content["metrics"].keys()) <= set(PERSONALISE_METRICS)
    assert personalised_path(spec, "r1").exists()


def test_clientapp_policy_off_refuses(tmp_path):
    node_config, spec = _spec(tmp_path, on=False)
    ctx = Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    reply = app(_message(_cfg()), ctx)
    assert reply.has_error() and reply.error.code == REFUSED
    assert "personalisation = false" in reply.error.reason
    assert PrivacyLedger(spec.ledger_path).releases(SITE) == []
    assert not personalised_path(spec, "r1").exists()


def test_fit_trains_only_the_head():
    ds = load_department("health")
    site = ds.site_data(SITE)
    torch.manual_seed(0)
    model = build_model(default_model_config(ds.schema))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = head_prefix(model)
    fit(model, site.train.tensors(), ds.schema.task, TrainConfig(epochs=2, lr=0.05, trainable=(head,)))
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]) != k.startswith(head), k
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again
    with pytest.raises(ValueError, match="matches no parameter"):
        fit(model, site.train.tensors(), ds.schema.task, TrainConfig(epochs=1, trainable=("nope",)))


def _loss(model, split, task):
    with torch.no_grad():
        return float(criterion_for(task)(model(torch.as_tensor(split.X)), torch.as_tensor(split.y)))


def test_federation_end_to_end(tmp_path):
    """A 2-round DP federation with personalisation: every node spends exactly its target, keeps a model
    that fits its own records better than the global one, and sends back none of it."""
    from simulations.run import default_policy, simulate

    cfg = {"department": "health", "run-dir": str(tmp_path / "run"), "num-rounds": 2, "local-epochs": 1,
           "batch-size": 32, "dp": True, "target-epsilon": 3.0, "run-id": "e2e", "central-data": "bundled",
           "fraction-evaluate": 0.0, "personalise-epochs": 10, "personalise-lr": 0.02, "strategy": "fedavgm"}
    res = simulate(cfg, engine="inprocess")
    pers = res["personalise"]
    ds = load_department("health")
    assert pers["asked"] == len(ds.sites) and not pers["refused"] and len(pers["nodes"]) == len(ds.sites)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["personalise"]["nodes"].keys() == pers["nodes"].keys()
    from safetensors.torch import load_file

    model_file = tmp_path / "run" / "model.safetensors"
    global_state = load_file(str(model_file)) if model_file.exists() else \
        torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    task = ds.schema.task
    better = 0
    for site in ds.sites:
        spec = node_from_config({}, {**cfg, "policy": str(default_policy("health")),
                                     "ledger-dir": str(tmp_path / "run" / "ledgers"), "partition-id": ds.sites.index(site)})
        ledger = PrivacyLedger(spec.ledger_path)
        delta = public_count(_released(spec, site), spec.policy)[1]  # follows the released count
        # the count release comes first (fraction-evaluate 0: no test count is released)
        assert [r["mechanism"] for r in ledger.releases(site)] == ["gaussian-count", "dp-sgd", "dp-sgd", "personalisation"]
        eps = ledger.run_epsilon(site, "e2e", delta)
        assert 2.95 <= eps <= 3.0 + 1e-9, (site, eps)
        g = build_model(default_model_config(ds.schema))
        g.load_state_dict(global_state)
        p = build_model(default_model_config(ds.schema))
        p.load_state_dict(load_personalised(personalised_path(spec, "e2e")))
        tr = ds.site_data(site).train
        better += _loss(p, tr, task) < _loss(g, tr, task)
    assert better >= len(ds.sites) - 1  # DP noise may leave one small hospital no better on its own records


def test_per_site_value_gains_and_worst():
    from simulations.compare import per_site_value

    def row(method, eps, site, mae):
        return {"method": method, "epsilon": eps, "site": site, "metrics": {"mae": mae}}

    rows = [row("local", None, "a", 2.0), row("federated", None, "a", 1.5), row("federated+personalised", None, "a", 1.0),
            row("local", None, "b", 1.0), row("federated", None, "b", 1.2), row("federated+personalised", None, "b", 1.1),
            row("local", 3.0, "a", 3.0), row("federated-dp+personalised", 3.0, "a", 2.4)]
    v = per_site_value(rows, ["a", "b"], "forecasting", (3.0,), {"a": 0.1, "b": -0.05})
    a, b = v["sites"]
    assert a["gain-personalised"] == pytest.approx(0.5) and b["gain-personalised"] == pytest.approx(-0.1)
    assert a["dp"]["3"]["gain-personalised"] == pytest.approx(0.2) and b["dp"]["3"]["personalised"] is None
    assert v["worst-site"] == {"site": "b", "gain": pytest.approx(-0.1)}
    assert v["worst-site-dp"]["3"]["site"] == "a" and a["loo-contribution"] == 0.1
    assert v["higher_is_better"] is False


def test_forecasting_node_keeps_its_gru(tmp_path):
    """A GRU (Opacus DPGRU: aliased parameter tensors) is kept as safetensors and loads back; non-private
    personalisation (policy require_dp = false) is recorded as a non-private release."""
    pol = tmp_path / "policy.toml"
    pol.write_text('department = "utility"\nmax_epsilon = 8.0\nmin_noise_multiplier = 0.5\nmax_clipping_norm = 1.0\n'
                   'allowed_tasks = ["utility-forecast"]\nmax_rounds_per_run = 10\nrequire_dp = false\n'
                   'personalisation = true\n')
    spec = node_from_config({"department": "utility", "site": "england-wales-2000", "policy": str(pol),
                             "ledger": str(tmp_path / "ledger.sqlite")}, {})
    ds = load_department("utility")
    torch.manual_seed(0)
    model = build_model(default_model_config(ds.schema, "gru"))
    cfg = {**_cfg(), "department": "utility", "task": "utility-forecast", "model": "gru", "dp": False,
           "personalise-epochs": 1, "personalise-layers": "all", "batch-size": 128}
    metrics = handle_personalise(model.state_dict(), cfg, spec)
    assert metrics["epsilon"] == math.inf  # a non-private release (was: nothing in the ledger)
    assert [r["mechanism"] for r in PrivacyLedger(spec.ledger_path).releases()] == ["non-private"]
    kept = build_model(default_model_config(ds.schema, "gru"))
    kept.load_state_dict(load_personalised(personalised_path(spec, "r1")))
    assert any(not torch.equal(a, b) for a, b in zip(kept.state_dict().values(), model.state_dict().values()))


def test_health_dp_comparison_splits_each_nodes_budget_half_and_half(tmp_path):
    """fl-sim compare's health DP runs (FED_DP_DEFAULTS): each node keeps half its DP-SGD steps for its
    own model, personalises as many epochs as local-only training, and its rounds' mean gradient is less
    noisy than at the non-private settings' batch; the non-private run is unchanged."""
    from clients.personalise import personalise_steps
    from simulations.baselines import DEFAULT_TRAIN
    from simulations.compare import FED_DEFAULTS, federated_settings

    _, spec = _spec(tmp_path)
    n = len(spec.site_data()[1].train)
    assert federated_settings("health", False) == FED_DEFAULTS["health"]
    dp = federated_settings("health", True)
    assert dp["personalise-epochs"] == DEFAULT_TRAIN[("health", "heart-mlp")].epochs
    assert dp["personalise-layers"] == "all"
    cfg = _cfg(**{k: dp[k] for k in ("num-rounds", "local-epochs", "batch-size", "lr", "personalise-epochs",
                                     "personalise-lr", "personalise-layers")}, **{"server-round": 1})
    rounds = job_from_config(cfg, spec, n)
    assert personalise_steps(cfg, spec, n) == rounds.steps * cfg["num-rounds"]  # half the run's steps each
    nodp = FED_DEFAULTS["health"]
    old = job_from_config(_cfg(**{k: nodp[k] for k in ("num-rounds", "local-epochs", "batch-size",
                                                       "personalise-epochs")}, **{"server-round": 1}), spec, n)
    # same target epsilon: noise std on the batch's mean clipped gradient (sigma / batch) is lower
    assert rounds.noise_multiplier / dp["batch-size"] < old.noise_multiplier / nodp["batch-size"]
    assert rounds.noise_multiplier > old.noise_multiplier  # still noise, calibrated to the same target


def test_a_non_private_personalisation_is_a_non_private_release(tmp_path):
    """Audit finding: under require_dp = false a dp = false personalisation wrote no ledger row and
    reported noise-multiplier 1.0, so the site kept claiming a finite epsilon afterwards."""
    _, spec = _spec(tmp_path, require_dp=False)
    metrics = handle_personalise(_global_state(), _cfg(dp=False, **{"personalise-epochs": 1}), spec)
    assert metrics["noise-multiplier"] == 0.0 and math.isinf(metrics["epsilon"])
    ledger = PrivacyLedger(spec.ledger_path)
    assert [(r["mechanism"], r["status"]) for r in ledger.releases(SITE)] == [("non-private", "committed")]
    assert math.isinf(ledger.epsilon(SITE, 1e-5))
