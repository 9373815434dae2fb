"""Empirical privacy audit (simulations/mia.py, fl-sim audit): the epsilon lower bound against
known values and a mechanism of known epsilon, LiRA against a simpler attack, and a small real
audit of health's local training (non-private control leaks more than DP; DP bound <= ledger)."""

import json
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations import mia


# ---------------------------------------------------------------- the bound


def test_perfect_attack_bound_is_what_the_sample_size_allows():
    # r = v guesses all correct, delta = 0: p-value(eps) = q^r with q = e^eps / (1 + e^eps)
    for r in (10, 100, 1000):
        q = 0.05 ** (1 / r)
        expected = math.log(q / (1 - q))
        got = mia.epsilon_lower_bound(m=2 * r, r=r, v=r, delta=0.0, confidence=0.95)
        assert got == pytest.approx(expected, rel=1e-4)
    # more perfect guesses, higher bound; higher confidence, lower bound
    assert mia.epsilon_lower_bound(1000, 100, 100, 0.0) > mia.epsilon_lower_bound(1000, 50, 50, 0.0)
    assert mia.epsilon_lower_bound(1000, 100, 100, 0.0, 0.99) < mia.epsilon_lower_bound(1000, 100, 100, 0.0, 0.95)


def test_delta_term_lowers_the_bound():
    no_delta = mia.epsilon_lower_bound(1000, 100, 90, 0.0)
    with_delta = mia.epsilon_lower_bound(1000, 100, 90, 1e-4)
    assert 0 < with_delta < no_delta
    # the p-value grows with delta and falls with eps
    assert mia.audit_p_value(1000, 100, 90, 1.0, 1e-4) > mia.audit_p_value(1000, 100, 90, 1.0, 0.0)
    assert mia.audit_p_value(1000, 100, 90, 2.0, 0.0) > mia.audit_p_value(1000, 100, 90, 1.0, 0.0)


def test_random_attack_gives_about_zero():
    rng = np.random.default_rng(1)
    bounds = []
    for _ in range(40):
        members = rng.random(2000) < 0.5
        scores = rng.standard_normal(2000)  # independent of membership
        bounds.append(mia.one_run_audit(scores, members, 1e-5, 0.95, 100, 100)["eps_lb"])
    # at 95 % confidence a guesser that knows nothing gets a positive bound about 5 % of the time
    assert sum(b > 0 for b in bounds) <= 6
    assert max(bounds) < 0.5


def test_bound_on_randomized_response_is_tight_and_never_above_its_epsilon():
    """A mechanism of known epsilon: each member bit reported correctly with prob e^eps/(1+e^eps)."""
    eps, m = 1.0, 20000
    rng = np.random.default_rng(7)
    hits = 0
    for trial in range(5):
        members = rng.random(m) < 0.5
        truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
        reported = np.where(truthful, members, ~members)
        scores = reported + 1e-3 * rng.random(m)  # ties broken at random
        res = mia.one_run_audit(scores, members, 0.0, 0.95, m // 2, m // 2)
        assert res["guesses"] == m
        assert res["eps_lb"] <= eps  # a valid lower bound
        hits += res["eps_lb"] > 0.9  # and a tight one with 20,000 guesses
    assert hits >= 4


def test_guess_outcome_counts_top_and_bottom():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    members = np.array([True, True, False, True, False, False])
    assert mia.guess_outcome(scores, members, 2, 0) == (2, 2)
    assert mia.guess_outcome(scores, members, 3, 2) == (5, 4)
    assert mia.guess_outcome(scores, members, 6, 6) == (6, 3)  # never guesses an example twice
    with pytest.raises(ValueError, match="differ in length"):
        mia.guess_outcome(scores, members[:3], 1, 1)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(-3, 60), r=st.integers(-3, 60), v=st.integers(-3, 60),
       eps=st.floats(-1, 50) | st.just(float("nan")), delta=st.floats(-0.5, 1.5) | st.just(float("nan")))
def test_p_value_validates_its_inputs(m, r, v, eps, delta):
    valid = 0 <= v <= r <= m and eps >= 0 and 0 <= delta <= 1
    if not valid:
        with pytest.raises(ValueError):
            mia.audit_p_value(m, r, v, eps, delta)
        return
    p = mia.audit_p_value(m, r, v, eps, delta)
    assert 0.0 <= p <= 1.0
    lb = mia.epsilon_lower_bound(m, r, v, delta)
    assert lb >= 0.0 and math.isfinite(lb)


@settings(max_examples=30, deadline=None)
@given(bad=st.sampled_from([0.0, 1.0, -0.1, 1.5, float("nan")]))
def test_confidence_must_be_a_probability(bad):
    with pytest.raises(ValueError, match="confidence"):
        mia.epsilon_lower_bound(10, 5, 5, 0.0, bad)


# ---------------------------------------------------------------- LiRA


def test_lira_beats_a_global_threshold_when_records_differ():
    """Per-record difficulty hides membership from one global threshold; LiRA's per-record Gaussians see it."""
    rng = np.random.default_rng(0)
    S, T, N = 32, 4, 500
    difficulty = 4.0 * rng.standard_normal(N)  # per record, much larger than the membership effect
    members = rng.random((S + T, N)) < 0.5
    phi = difficulty + 1.0 * members + 0.5 * rng.standard_normal((S + T, N))
    scores = mia.lira_scores(phi[:S], members[:S], phi[S:])
    lira = mia.roc_summary(scores, members[S:])
    threshold = mia.roc_summary(phi[S:], members[S:])
    assert lira["auc"] > 0.85
    assert threshold["auc"] < 0.65
    assert lira["tpr_at_fpr"]["0.01"] > 5 * threshold["tpr_at_fpr"]["0.01"]
    # leave-one-out scores of the shadows are as informative as the targets'
    loo = mia.roc_summary(mia.lira_scores_leave_one_out(phi[:S], members[:S]), members[:S])
    assert abs(loo["auc"] - lira["auc"]) < 0.05


def test_roc_summary_on_perfect_and_reversed_scores():
    members = np.array([True] * 50 + [False] * 50)
    perfect = mia.roc_summary(np.arange(100)[::-1].astype(float), members)
    assert perfect["auc"] == 1.0 and perfect["tpr_at_fpr"]["0.001"] == 1.0
    reversed_ = mia.roc_summary(np.arange(100).astype(float), members)
    assert reversed_["auc"] == 0.0 and reversed_["tpr_at_fpr"]["0.1"] == 0.0


def test_roc_summary_tests_the_auc_against_chance():
    members = np.array([True] * 16 + [False] * 16)
    # AUC 0.64 on 16 vs 16: about 1.3 standard errors above 0.5, what chance gives one time in ten
    scores = np.r_[np.arange(16) + 2.5, np.arange(16.0)]
    small = mia.roc_summary(scores, members)
    assert 0.6 <= small["auc"] < 0.7 and 0.05 < small["p_value"] < 0.2
    big = mia.roc_summary(np.r_[np.tile(scores[:16], 20), np.tile(scores[16:], 20)], np.repeat(members, 20))
    assert big["auc"] == pytest.approx(small["auc"]) and big["p_value"] < 1e-6


def test_control_verdict_needs_leakage_beyond_chance():
    """Independent privacy audit (2026-12-07, L2): a control's AUC >= 0.6 on a handful of canaries was
    called clear leakage (the attack can test DP bounds) though chance gives it one time in ten."""
    def control(auc, p, eps_lb=0.0):
        part = {"auc": auc, "p_value": p, "n_members": 16, "n_nonmembers": 16}
        return {"epsilon": None, "eps_lb": eps_lb, "records": {**part, "auc": 0.5, "p_value": 0.5}, "canaries": part}

    assert mia._verdict(control(0.639, 0.1)).startswith("attack too weak")
    assert mia._verdict(control(0.639, 0.001)).startswith("clear leakage")
    assert mia._verdict(control(0.55, 1e-9)).startswith("attack too weak")  # beyond chance, but not clear
    assert mia._verdict(control(0.5, 0.5, eps_lb=1.2)).startswith("clear leakage")  # the bound is a test of its own


def test_canaries_are_atypical_and_labelled_at_random():
    rng = np.random.default_rng(0)
    X = np.c_[rng.standard_normal((300, 3)), rng.integers(0, 2, (300, 2))].astype(np.float32)
    y = rng.integers(0, 2, 300).astype(np.float32)
    cX, cy = mia.make_canaries(X, y, 200, rng, "binary-classification")
    assert cX.shape == (200, 5) and cy.shape == (200,)
    assert np.all(np.abs(cX[:, :3]) > 2.0)  # continuous features far out
    assert set(np.unique(cX[:, 3:])) <= {0.0, 1.0}  # binary ones stay binary
    assert 0.35 < cy.mean() < 0.65


# ---------------------------------------------------------------- a real audit


@pytest.fixture
def job_seeded(monkeypatch):
    monkeypatch.setenv("CITYFED_DP_SEED_FROM_JOB", "1")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_small_health_audit_control_leaks_more_and_dp_stays_below_ledger(tmp_path, job_seeded):
    from privacy.ledger import PrivacyLedger

    s = mia.AuditSettings(department="health", epsilons=(1.0,), shadows=6, targets=2, canaries=64, seed=3,
                          sites=("Cleveland",))
    res = mia.run_audit(s, tmp_path)
    control, dp = res["rows"]
    assert control["epsilon"] is None and dp["epsilon"] == 1.0
    # the non-private model leaks its canaries clearly; DP-SGD at eps 1 hides them
    assert control["canaries"]["auc"] > 0.7
    assert control["canaries"]["auc"] > dp["canaries"]["auc"] + 0.15
    assert control["eps_lb"] >= dp["eps_lb"]
    assert control["verdict"].startswith("clear leakage")
    # the DP row: bound below the ledger's epsilon, which is the real ledger's on disk
    assert dp["eps_lb"] <= dp["ledger_epsilon"]
    assert dp["ok"] and res["ok"]
    ledger = PrivacyLedger(tmp_path / "ledgers" / "audit-eps1.sqlite")
    for t in dp["targets"]:
        assert ledger.epsilon(t["site"], dp["delta"]) == pytest.approx(t["ledger_epsilon"])
        assert t["ledger_epsilon"] == pytest.approx(t["fit_epsilon"], rel=1e-9)
        assert t["ledger_epsilon"] <= 1.0 + 1e-6
        assert t["noise_multiplier"] > 0.5
    assert dp["ledger_epsilon"] == max(t["ledger_epsilon"] for t in dp["targets"])
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["rows"][1]["ledger_epsilon"] == dp["ledger_epsilon"]
    assert saved["meta"]["attack"]["shadows"] == 6 and saved["meta"]["pool"]["canaries"] == 64
    # the readable page shows the same figures, formatted (no raw JSON)
    from server.audit_report import write_audit_report

    page = write_audit_report(tmp_path).read_text()
    assert f"{dp['ledger_epsilon']:.3f}" in page and f"{control['canaries']['auc']:.3f}" in page
    assert "consistent" in page and "{" not in page.split("</style>")[1]
    # a second audit into the same folder would add to its ledgers: refused
    with pytest.raises(FileExistsError, match="ledgers"):
        mia.run_audit(s, tmp_path)


def test_cli_audit_writes_json_and_checks_options(tmp_path, job_seeded):
    from typer.testing import CliRunner

    from simulations.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["audit", "-d", "health", "--accountant", "pld", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "rdp" in bad.output
    bad = runner.invoke(app, ["audit", "-d", "police", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "health" in bad.output
    ok = runner.invoke(app, ["audit", "-d", "health", "--shadows", "2", "--targets", "1", "--canaries", "16",
                             "-e", "8", "--no-control", "--site", "Cleveland", "--out", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert "eps=8" in ok.output and "empirical privacy audit" in ok.output
    assert (tmp_path / "report.html").exists() and "no non-private control" in (tmp_path / "report.html").read_text()
    res = json.loads((tmp_path / "audit.json").read_text())
    assert res["meta"]["pool"]["sites"] == ["Cleveland"] and len(res["rows"]) == 1
    assert res["rows"][0]["ledger_epsilon"] <= 8.0 + 1e-6 and res["rows"][0]["accountant"] == "rdp"
    from privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(tmp_path / "ledgers" / "audit-eps8.sqlite")
    assert ledger.epsilon("target-0", res["rows"][0]["delta"]) == pytest.approx(res["rows"][0]["ledger_epsilon"])
    again = runner.invoke(app, ["audit", "-d", "health", "--shadows", "2", "--targets", "1", "--canaries", "16",
                                "-e", "8", "--no-control", "--site", "Cleveland", "--out", str(tmp_path)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    unknown = runner.invoke(app, ["audit", "-d", "health", "--site", "Atlantis", "--out", str(tmp_path / "x")])
    assert unknown.exit_code == 2 and "Atlantis" in unknown.output and "Cleveland" in unknown.output


def _audit_result(eps_lb_dp: float, control_leaks: bool | None) -> dict:
    rows = [] if control_leaks is None else [{"setting": "no DP", "epsilon": None, "ledger_epsilon": None, "eps_lb": 1.2,
                                              "records": {"auc": 0.61}, "canaries": {"auc": 0.8}, "verdict": "x"}]
    rows.append({"setting": "eps=3", "epsilon": 3.0, "ledger_epsilon": 2.99, "eps_lb": eps_lb_dp, "delta": 1e-4,
                 "records": {"auc": 0.52, "tpr_at_fpr": {"0.01": 0.02}}, "canaries": {"auc": 0.55}, "verdict": "y"})
    return {"meta": {"department": "health"}, "rows": rows, "control_leaks": control_leaks}


@pytest.mark.parametrize("eps_lb,control,ok,phrase", [
    (0.5, True, True, "leaks clearly"),
    (0.0, False, True, "attack is too weak"),
    (0.0, None, True, "no non-private control"),
    (3.5, True, False, "DEFECT"),
])
def test_audit_page_reading(eps_lb, control, ok, phrase, tmp_path):
    """The page's verdict: a DP bound above its ledger epsilon is a defect; a weak attack proves nothing."""
    from server.audit_report import verdict, write_audit_report

    res = _audit_result(eps_lb, control)
    got_ok, sentence = verdict(res)
    assert got_ok is ok and phrase in sentence
    (tmp_path / "audit.json").write_text(json.dumps(res))
    page = write_audit_report(tmp_path).read_text()
    assert phrase in page
    assert ("&gt; ledger" in page) is (not ok)


def test_audit_page_refuses_a_file_that_is_not_an_audit(tmp_path):
    from server.audit_report import write_audit_report

    (tmp_path / "audit.json").write_text(json.dumps({"meta": {}, "summary": []}))
    with pytest.raises(ValueError, match="not an fl-sim audit"):
        write_audit_report(tmp_path)


def test_audit_page_write_that_fails_leaves_no_temp_file_and_the_earlier_page(tmp_path, monkeypatch):
    """A page that cannot be written (disk full at the rename) leaves the earlier report.html as it was
    and no report.html.tmp that would block or confuse a rerun."""
    from pathlib import Path

    from server.audit_report import write_audit_report

    (tmp_path / "audit.json").write_text(json.dumps(_audit_result(0.5, True)))
    before = write_audit_report(tmp_path).read_bytes()
    (tmp_path / "audit.json").write_text(json.dumps(_audit_result(0.0, False)))

    def full(self, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", full)
    with pytest.raises(OSError, match="No space left"):
        write_audit_report(tmp_path)
    assert (tmp_path / "report.html").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.json", "report.html"]
