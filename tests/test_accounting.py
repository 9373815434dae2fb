"""The accountant switch (issue 12.3): PRV epsilon between an independent PLD accountant and RDP.

The independent accountant is Google's dp-accounting (PLD, add-or-remove-one neighbouring,
pessimistic estimate): the ledger's PRV epsilon may never fall below it by more than 1 %, and
never exceeds Opacus' RDP accountant on the same releases.
"""

from __future__ import annotations

import math
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privacy import accounting
from privacy.accounting import PRVUnavailable, epsilon, prv_bounds, prv_epsilon, rdp_epsilon
from privacy.dp import calibrate_noise
from privacy.ledger import LedgerError, PrivacyLedger, Release

warnings.filterwarnings("ignore", category=UserWarning)
from fed_helpers import POLICY, SITES  # noqa: E402


def pld_epsilon(history, delta: float) -> float:
    """dp-accounting's PLD accountant (independent of Opacus) on ``(noise, q, steps)`` releases."""
    import dp_accounting

    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    for noise, q, steps in history:
        if steps == 0 or q == 0:
            continue
        event = dp_accounting.GaussianDpEvent(noise)
        acc.compose(event if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, event), int(steps))
    return float(acc.get_epsilon(delta))


def opacus_rdp(history, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta))


# one DP-SGD run at a site's sampling rate, or a Gaussian metric release (q = 1: the node's
# training loss, one sum; an evaluation, 2-3 sums), as the node's ledger records them
_sgd = st.tuples(st.floats(0.6, 4.0).map(lambda x: round(x, 3)), st.sampled_from([0.02, 0.05, 0.1, 1 / 7, 0.25, 1 / 3]),
                 st.integers(1, 150))
_metric = st.tuples(st.sampled_from([1.0, 2.0, 5.0, 10.0, 30.0]), st.just(1.0), st.integers(1, 20))
_histories = st.lists(st.one_of(_sgd, _sgd, _metric), min_size=1, max_size=5)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_histories, st.sampled_from([1e-5, 1e-4, 4.9e-4, 1e-3]))
def test_prv_between_independent_pld_and_rdp_on_random_histories(history, delta):
    prv, rdp, pld = prv_epsilon(history, delta), rdp_epsilon(history, delta), pld_epsilon(history, delta)
    assert rdp == pytest.approx(opacus_rdp(history, delta), rel=1e-9)
    assert prv <= rdp
    assert prv >= 0.99 * pld, (history, delta, prv, pld)


def test_prv_is_tighter_than_rdp_on_typical_releases():
    # health, Cleveland-like: 203 records, batch 32 (q = 1/7), 15 rounds x 2 epochs, delta 1/(10 n)
    history, delta = [(2.5, 1 / 7, 210)], 1 / 2030
    prv, rdp, pld = prv_epsilon(history, delta), rdp_epsilon(history, delta), pld_epsilon(history, delta)
    assert 0.99 * pld <= prv < 0.93 * rdp
    # with DP metric releases at q = 1 (training loss each round, 5 evaluations of 2 sums)
    history += [(10.0, 1.0, 15), (10.0, 1.0, 10)]
    prv, rdp, pld = prv_epsilon(history, delta), rdp_epsilon(history, delta), pld_epsilon(history, delta)
    assert 0.99 * pld <= prv < 0.93 * rdp


def test_prv_is_opacus_prv_accountants_upper_bound():
    from opacus.accountants import PRVAccountant

    for history, delta in [([(1.1, 0.25, 40)], 1e-3), ([(0.9, 0.1, 120), (10.0, 1.0, 6)], 1e-5),
                           ([(5.0, 1.0, 10)], 1e-5)]:
        acc = PRVAccountant()
        acc.history = list(history)
        upper = acc.get_epsilon(delta)  # Opacus returns its upper bound (eps_error 0.01, delta_error delta/1000)
        low, est, up = prv_bounds(history, delta)
        assert up == pytest.approx(upper, rel=1e-9) and low < est < up
        assert prv_epsilon(history, delta) == pytest.approx(min(upper, rdp_epsilon(history, delta)), rel=1e-12)
    # same (noise, q) in several entries (rounds of one run) is the same composition
    assert prv_epsilon([(1.1, 0.25, 10)] * 4, 1e-3) == prv_epsilon([(1.1, 0.25, 40)], 1e-3)


def test_prv_edge_cases_are_conservative(monkeypatch):
    assert prv_epsilon([], 1e-5) == 0.0 and epsilon([], 1e-5, "prv") == 0.0
    assert prv_epsilon([(1.0, 0.1, 0)], 1e-5) == 0.0  # nothing released
    assert math.isinf(prv_epsilon([(0.0, 0.1, 5)], 1e-5))  # no noise: no guarantee
    with pytest.raises(PRVUnavailable):
        prv_bounds([(0.0, 0.1, 5)], 1e-5)
    # where Opacus' PRV cannot run (here: a grid over the cap), RDP's epsilon is reported, never less
    history = [(1.3, 0.2, 33)]
    accounting._prv_bounds.cache_clear()
    monkeypatch.setattr(accounting, "PRV_MAX_GRID", 10)
    assert prv_epsilon(history, 1e-4) == rdp_epsilon(history, 1e-4)
    monkeypatch.undo()
    accounting._prv_bounds.cache_clear()
    assert prv_epsilon(history, 1e-4) < rdp_epsilon(history, 1e-4)
    with pytest.raises(ValueError, match="accountant must be one of 'rdp', 'prv'"):
        epsilon(history, 1e-4, "pld")


def _ledger_with_random_releases(path, rng, accountant="prv"):
    """Several runs of DP-SGD rounds plus metric releases, some aborted (not counted), some pending."""
    led = PrivacyLedger(path, accountant=accountant)
    for run in range(rng.randint(1, 3)):
        q = rng.choice([1 / 4, 1 / 7, 0.05])
        noise = round(rng.uniform(0.8, 3.0), 3)
        for rnd in range(1, rng.randint(2, 6)):
            for mech, n, qq, k in (("dp-sgd", noise, q, rng.randint(4, 30)), ("gaussian-train-loss", 10.0, 1.0, 1),
                                   ("gaussian-eval", 10.0, 1.0, 2)):
                if mech != "dp-sgd" and rng.random() < 0.5:
                    continue
                rid = led.begin(Release(n, qq, k, 1e-4, f"run-{run}", rnd, "Cleveland", "health", mechanism=mech))
                fate = rng.random()
                if fate < 0.15:
                    led.abort(rid, "failed before the release")
                elif fate < 0.9:
                    led.commit(rid)
    return led


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ledger_epsilon_checked_against_independent_accountants(tmp_path, seed):
    import random

    led = _ledger_with_random_releases(tmp_path / "l.sqlite", random.Random(seed))
    rows = [r for r in led.releases("Cleveland") if r["status"] in ("pending", "committed")]
    assert rows and {r["accountant"] for r in led.releases("Cleveland")} == {"prv"}
    independent = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in rows]
    for delta in (1e-4, 1e-5):
        eps = led.epsilon("Cleveland", delta)
        assert 0.99 * pld_epsilon(independent, delta) <= eps < opacus_rdp(independent, delta)
        assert PrivacyLedger(led.path).epsilon("Cleveland", delta) == pytest.approx(opacus_rdp(independent, delta))
    # per run too
    run = rows[0]["run_id"]
    run_rows = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in rows if r["run_id"] == run]
    eps = led.run_epsilon("Cleveland", run, 1e-4)
    assert 0.99 * pld_epsilon(run_rows, 1e-4) <= eps <= opacus_rdp(run_rows, 1e-4)


def test_mixed_ledger_is_accounted_by_the_accountant_chosen_now(tmp_path):
    path = tmp_path / "l.sqlite"
    rdp_led = PrivacyLedger(path)  # default: rdp
    rdp_led.commit(rdp_led.begin(Release(1.2, 0.1, 60, 1e-4, "a", 1, "s", "health")))
    prv_led = PrivacyLedger(path, accountant="prv")
    rid = prv_led.begin(Release(1.0, 0.2, 30, 1e-4, "b", 1, "s", "health"), max_epsilon=50.0, delta=1e-4)
    prv_led.commit(rid)
    assert [r["accountant"] for r in prv_led.releases("s")] == ["rdp", "prv"]  # what each release was checked by
    history = [(1.2, 0.1, 60), (1.0, 0.2, 30)]
    assert prv_led.epsilon("s", 1e-4) == prv_epsilon(history, 1e-4)  # the whole history, by PRV
    assert rdp_led.epsilon("s", 1e-4) == rdp_epsilon(history, 1e-4)  # the whole history, by RDP
    assert prv_led.epsilon("s", 1e-4, accountant="rdp") == rdp_epsilon(history, 1e-4)
    assert prv_led.epsilon("s", 1e-4) < rdp_led.epsilon("s", 1e-4)
    # a release that names another accountant than the ledger's is an error, nothing written
    with pytest.raises(LedgerError, match="accountant 'rdp'.*'prv'"):
        prv_led.begin(Release(1.0, 0.2, 30, 1e-4, "b", 2, "s", "health", accountant="rdp"))
    assert len(prv_led.releases("s")) == 2
    with pytest.raises(ValueError, match="accountant"):
        PrivacyLedger(path, accountant="gdp")


def test_budget_check_in_begin_uses_the_ledgers_accountant(tmp_path):
    history = [(1.0, 0.25, 40)]
    prv, rdp = prv_epsilon(history, 1e-4), rdp_epsilon(history, 1e-4)
    budget = (prv + rdp) / 2
    r = Release(1.0, 0.25, 40, 1e-4, "a", 1, "s", "health")
    from privacy.ledger import BudgetExceededError

    with pytest.raises(BudgetExceededError, match="RDP accountant"):
        PrivacyLedger(tmp_path / "rdp.sqlite").begin(r, max_epsilon=budget, delta=1e-4)
    PrivacyLedger(tmp_path / "prv.sqlite", accountant="prv").begin(r, max_epsilon=budget, delta=1e-4)


@pytest.mark.parametrize(("target", "reserved"), [(1.0, ()), (3.0, ()), (3.0, ((10.0, 1.0, 15), (10.0, 1.0, 10)))])
def test_prv_calibration_gives_less_noise_and_stays_on_target(tmp_path, target, reserved):
    q, steps, delta = 1 / 7, 210, 1 / 2030  # health, Cleveland-like, 15 rounds x 2 epochs
    rdp_sigma = calibrate_noise(target, delta, q, steps, reserved)
    prv_sigma = calibrate_noise(target, delta, q, steps, reserved, accountant="prv")
    assert prv_sigma < 0.95 * rdp_sigma
    history = [(prv_sigma, q, steps), *reserved]
    assert prv_epsilon(history, delta) <= target
    assert prv_epsilon([(prv_sigma * 0.997, q, steps), *reserved], delta) > target  # the smallest, within 0.3 %
    assert rdp_epsilon(history, delta) > target  # RDP would not have allowed this noise
    # the ledger (PRV) holding these releases, round by round, lands at or below the target
    led = PrivacyLedger(tmp_path / "l.sqlite", accountant="prv")
    for rnd in range(15):
        led.commit(led.begin(Release(prv_sigma, q, steps // 15, delta, "r", rnd + 1, "s", "health")))
    for n, qq, k in reserved:
        led.commit(led.begin(Release(n, qq, k, delta, "r", 15, "s", "health", mechanism="gaussian-eval")))
    assert led.run_epsilon("s", "r", delta) <= target and led.epsilon("s", delta) <= target


def test_calibration_refuses_when_reserved_releases_spend_the_target():
    from privacy.dp import CalibrationError

    with pytest.raises(CalibrationError):
        calibrate_noise(0.5, 1e-5, 0.1, 100, [(1.0, 1.0, 10)], accountant="prv")
    with pytest.raises(ValueError, match="accountant"):
        calibrate_noise(1.0, 1e-5, 0.1, 100, accountant="gdp")


# -- the node, end to end in-process ------------------------------------------------------------


def _released_delta(ledger, site: str) -> float:
    """The delta a health node accounts at: 1/(10 n) of its released training count n, or the policy's 1e-3 if smaller."""
    (row,) = PrivacyLedger(ledger).counts(site, split="train")  # released once
    return min(1 / (10 * row["value"]), 1e-3)


def test_dp_federation_with_prv_policy_lands_on_target_with_less_noise(tmp_path):
    from clients.app import app as client_app
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    runs = {}
    for acc in ("rdp", "prv"):
        nodes = []
        for site in SITES[:2]:
            pol = tmp_path / f"{acc}-{site}.toml"
            pol.write_text(POLICY.format(eps=8.0) + f'accountant = "{acc}"\n')
            nodes.append({"department": "health", "site": site, "policy": str(pol),
                          "ledger": str(tmp_path / f"{acc}-{site}.sqlite")})
        cfg = {"department": "health", "num-rounds": 2, "local-epochs": 1, "batch-size": 32, "lr": 0.02,
               "target-epsilon": 2.0, "run-dir": str(tmp_path / f"run-{acc}"), "min-nodes": 1, "central-data": "bundled"}
        res = run_federation(InProcessGrid(client_app, nodes), cfg, run_id=f"r-{acc}")
        assert [e["round"] for e in res["rounds"]] == [1, 2] and res["rounds"][-1]["train"]["accepted"] == 2
        runs[acc] = nodes
    for i, site in enumerate(SITES[:2]):
        rows = {acc: PrivacyLedger(runs[acc][i]["ledger"]).releases(site) for acc in runs}
        # count release: each node first released its training count (noised, once), then trained two rounds
        for acc in runs:
            assert [(r["mechanism"], r["accountant"]) for r in rows[acc]] == [
                ("gaussian-count", acc), ("dp-sgd", acc), ("dp-sgd", acc)]
        # the site's delta follows its released training count (each ledger released its own)
        delta = {acc: _released_delta(runs[acc][i]["ledger"], site) for acc in runs}
        noise = {acc: max(r["noise_multiplier"] for r in rows[acc] if r["mechanism"] == "dp-sgd") for acc in rows}
        assert noise["prv"] < 0.95 * noise["rdp"], (site, noise)
        prv_led = PrivacyLedger(runs["prv"][i]["ledger"], accountant="prv")
        eps = prv_led.run_epsilon(site, "r-prv", delta["prv"])
        assert 1.9 < eps <= 2.0 + 1e-9, (site, eps)  # at or below the target, and close to it
        independent = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in rows["prv"]]  # count included
        assert eps >= 0.99 * pld_epsilon(independent, delta["prv"])
        assert rdp_epsilon(independent, delta["prv"]) > 2.0  # the same run is over target by RDP's count
        rdp_eps = PrivacyLedger(runs["rdp"][i]["ledger"]).run_epsilon(site, "r-rdp", delta["rdp"])
        assert 1.9 < rdp_eps <= 2.0 + 1e-9


def test_fit_with_prv_settings_calibrates_less_noise_and_reports_prv_epsilon():
    import torch
    from torch.utils.data import TensorDataset

    from clients.training import TrainConfig, fit
    from shared_models import HeartClassifierConfig, build_model

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 13, generator=g)
    data = TensorDataset(x, (x.sum(1) > 0).float())
    from privacy.dp import DPSettings

    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e-2)
    out = {}
    for acc in ("rdp", "prv"):
        out[acc] = fit(build_model(HeartClassifierConfig(n_features=13)), data, "binary-classification", cfg,
                       DPSettings(target_epsilon=2.0, accountant=acc))
    rdp, prv = out["rdp"], out["prv"]
    assert prv.noise_multiplier < 0.95 * rdp.noise_multiplier
    history = [(prv.noise_multiplier, prv.sample_rate, 24)]
    assert prv.epsilon == pytest.approx(prv_epsilon(history, prv.delta), rel=1e-12)
    assert 1.9 < prv.epsilon <= 2.0 < rdp_epsilon(history, prv.delta)
