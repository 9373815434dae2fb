"""The run report (server/report.py): formatting helpers, every section from sample results.json
dicts (simulation, deployment with SecAgg+, fl-sim compare), escaping, missing fields, ledgers,
the coordinator audit log, and a report failure that never fails a run. Fast: no training."""

import json
import logging
import re

import pytest

from server import report as R

SITES = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]


def visible_text(page: str) -> str:
    """The page's text as a reader sees it (no <style>, no tags, entities decoded)."""
    import html

    body = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", body))


def assert_no_raw_json(page: str) -> None:
    text = visible_text(page)
    assert not re.search(r"[{}\[\]]", text), re.findall(r".{0,40}[{}\[\]].{0,40}", text)[:3]


def sim_results() -> dict:
    """A simulation's results.json (the fields fl-sim run writes), two rounds, DP eval releases."""
    node = lambda pid, n, eps, **kw: {"num-examples": n, "epsilon": eps, "noise-multiplier": 1.25, "steps": 7,
                                       "partition-id": pid, **kw}
    return {
        "run_id": "sim-1", "status": "completed", "seconds": 12.5,
        "config": {"department": "health", "model": "heart-mlp", "num-rounds": 2, "strategy": "fedavg", "dp": True,
                   "target-epsilon": 3.0, "noise-multiplier": -1.0, "clipping-norm": 1.0, "secagg": False,
                   "local-epochs": 1, "batch-size": 32, "lr": 0.01, "fraction-train": 1.0, "fraction-evaluate": 1.0,
                   "min-accepted": 1, "round-timeout": "auto", "central-data": "bundled"},
        "job": {"department": "health", "local-epochs": 1, "batch-size": 32, "lr": 0.01, "dp": True},
        "initial": {"central": {"accuracy": 0.464, "num-examples": 306},
                    "central-sites": {"Cleveland": {"accuracy": 0.5346, "num-examples": 101}}},
        "rounds": [
            {"round": 1, "train": {"nodes": {"11": node(0, 203, 1.9123), "12": node(1, 196, 1.8)}, "accepted": 2,
                                   "seconds": 5.3, "aggregate": {"epsilon-max": 1.9123}},
             "evaluate": {"aggregate": {"accuracy": 0.432}, "nodes": {"11": node(0, 101, 1.95, accuracy=0.43)},
                          "declined": {"12": "policy: local evaluation is off"}, "seconds": 0.04},
             "central": {"accuracy": 0.48, "num-examples": 306},
             "central-sites": {"Cleveland": {"accuracy": 0.6, "num-examples": 101}}},
            {"round": 2, "train": {"nodes": {"11": node(0, 203, 2.9991), "12": node(1, 196, 2.5)}, "accepted": 2,
                                   "seconds": 0.24, "deadline": {"seconds": 30.0, "basis": "5 x slowest"}},
             "evaluate": {"aggregate": {"accuracy": 0.761}, "nodes": {"11": node(0, 101, 2.9995, accuracy=0.656)},
                          "declined": {}, "seconds": 0.05},
             "central": {"accuracy": 0.7124, "num-examples": 306},
             "central-sites": {"Cleveland": {"accuracy": 0.7228, "num-examples": 101}}},
        ],
        "refused": [{"round": 2, "node": 13, "code": 1, "reason": "policy: target epsilon 3 over max_epsilon 2"}],
        "excluded": [{"round": 1, "node": 14, "reason": "update norm 1.2e+04 exceeds max-update-norm 1000"}],
        "dropped": [],
    }


def deployment_results() -> dict:
    """A deployment run under SecAgg+ that stopped: nodes by ID, stages, drops, resumes, central sites."""
    return {
        "run_id": "7001", "status": "stopped: round 3: SecAgg+: 2 contributing node(s), fewer than min-accepted=3",
        "rounds-completed": 2, "seconds": 95.0,
        "config": {"department": "traffic", "model": "patchtst", "num-rounds": 5, "dp": True, "target-epsilon": 8.0,
                   "secagg": True, "secagg-num-shares": 3, "secagg-threshold": 2, "round-timeout": 120.0,
                   "central-data": "/srv/central.parquet"},
        "job": {"local-epochs": 1, "batch-size": 64, "lr": 0.001, "dp": True},
        "resumes": [{"flower-run-id": "7002", "after-round": 1, "at": "2026-12-03T10:00:00Z"}],
        "rounds": [
            {"round": 1, "train": {"nodes": {"5": {"num-examples": 2000, "epsilon": 2.1}}, "accepted": 3,
                                   "secagg": {"sampled": 4, "dropped": [{"node": 6, "stage": "unmask", "reason": "deadline 30 s passed"}]},
                                   "seconds": 14.2, "stages": {"setup": {"seconds": 3.1}, "share-keys": {"seconds": 2.2},
                                                               "collect": {"seconds": 6.0}, "unmask": {"seconds": 2.9}}},
             "central": {"mae_ratio": 0.91, "num-examples": 500},
             "central-sites": {"detector-01": {"mae_ratio": 0.88, "num-examples": 250}}},
            {"round": 2, "train": {"nodes": {}, "accepted": 0, "rejected": "aggregate update is not finite",
                                   "seconds": 12.0}},
            {"round": 3, "train": {"nodes": {}, "accepted": 0, "seconds": 40.0,
                                   "stopped": "round 3: SecAgg+: 2 contributing node(s); global model unchanged, run ended"}},
        ],
        "refused": [{"round": 3, "node": 7, "code": 1, "reason": "budget: epsilon 8.4 would exceed max_epsilon 8"}],
        "excluded": [{"round": 2, "node": "secure-aggregate", "reason": "aggregate update is not finite"}],
        "dropped": [{"round": 1, "node": 6, "stage": "unmask", "reason": "deadline 30 s passed"}],
    }


def compare_results() -> dict:
    row = lambda method, eps, site, acc, spent=None: {"method": method, "epsilon": eps, "site": site,
                                                      "metrics": {"accuracy": acc, "num-examples": 101}, "epsilon_spent": spent}
    return {
        "meta": {"command": "fl-sim compare", "department": "health", "model": "heart-mlp", "seed": 0, "epsilons": [3.0],
                 "federated": {"num-rounds": 15, "local-epochs": 2, "batch-size": 32, "lr": 0.01, "strategy": "fedavg"},
                 "engine": "inprocess", "seconds": 50.3, "seconds_per_run": {"federated": 1.46, "federated-dp-eps3": 16.2}},
        "summary": [{"method": "local", "epsilon": None, "epsilon_spent_max": None, "accuracy": 0.804},
                    {"method": "federated-dp", "epsilon": 3.0, "epsilon_spent_max": 2.9995, "accuracy": 0.788}],
        "rows": [row("pooled", None, "Cleveland", 0.75), row("local", None, "Cleveland", 0.7624),
                 row("federated", None, "Cleveland", 0.7921), row("federated-dp", 3.0, "Cleveland", 0.7327, 2.9938),
                 {"method": "federated-dp", "epsilon": 3.0, "site": "refusals", "metrics": {},
                  "refused": [{"round": 4, "node": 3, "reason": "budget spent"}], "epsilon_spent": None}],
    }


# -- formatting helpers -------------------------------------------------------------------
def test_number_formats_have_units_and_no_json():
    assert R.fmt_num(0.71242) == "0.712" and R.fmt_num(3) == "3" and R.fmt_num(12345) == "12,345"
    assert R.fmt_num(None) == "—" and R.fmt_num(float("nan")) == "n/a" and R.fmt_num(float("inf")) == "∞"
    assert R.fmt_num(True) == "yes" and R.fmt_num("auto") == "auto" and R.fmt_num(0.5, unit="s") == "0.500 s"
    assert R.fmt_seconds(0.413) == "0.41 s" and R.fmt_seconds(45.417) == "45.4 s" and R.fmt_seconds(None) == "—"
    assert R.fmt_delta(0.000492610837) == "4.93e-04" and R.fmt_delta(None) == "—"
    assert R.fmt_eps(2.99961) == "3.000" and R.fmt_int(614.0) == "614" and R.fmt_int(None) == "—"
    text = R.fmt_value({"a": 1, "b": [0.5, "x"], "c": None})
    assert text == "a: 1; b: 0.5000, x; c: —" and not re.search(r"[{}\[\]]", text)
    assert R.metric_value({"mae_ratio": 0.9}, "mae-ratio") == 0.9 and R.metric_value({"accuracy": "x"}, "accuracy") is None


def test_tables_escape_every_value():
    evil = '<script>alert("x")</script>&'
    t = R.table(["h<1>"], [[evil], [R.num(evil)]], caption=evil)
    assert "<script>" not in t and "&lt;script&gt;" in t and "h&lt;1&gt;" in t and "&amp;" in t
    kv = R.kv_table([("k<", evil)])
    assert "<script>" not in kv and "k&lt;" in kv
    assert "<script>" not in R.reasons_list([evil]) and "<script>" not in R.status_badge(evil)
    headers, rows = R.drop_empty_columns(["a", "b", "c"], [["x", "—", R.num("1")], ["y", None, R.num("—")]])
    assert headers == ["a", "c"] and rows == [["x", R.num("1")], ["y", R.num("—")]]


# -- run pages ----------------------------------------------------------------------------
def test_simulation_page_renders_every_section_with_values(tmp_path):
    res = sim_results()
    ledgers = {"Cleveland": {"delta": 4.926e-4, "deltas": [4.926e-4], "accountant": ["rdp"], "run-epsilon": 2.9995,
                             "lifetime-epsilon": 2.9995, "aborted": 0, "other-runs": 1,
                             "mechanisms": {"dp-sgd": {"releases": 2, "steps": 14, "noise": (1.25, 1.3), "sample-rate": [0.1429],
                                                       "replays": 0, "epsilon": 2.87},
                                            "gaussian-eval": {"releases": 2, "steps": 4, "noise": (10.0, 10.0),
                                                              "sample-rate": [1.0], "replays": 0, "epsilon": 0.729}}}}
    page = R.render_run_page(res, SITES, "accuracy", plots={"metric.png": "accuracy per site"}, ledgers=ledgers)
    for h in ("Run", "Plots", "Rounds", "Sites", "Privacy per site and mechanism", "Audit", "Refusals", "Exclusions",
              "No reply (dropped, incl. SecAgg+ stages)"):
        assert f"<h2>{h}</h2>" in page, h
    assert 'class="error"' not in page
    text = " ".join(visible_text(page).split())
    assert "after 2 of 2 rounds" in text and "completed" in text
    assert "5.30 s" in text and "0.24 s" in text and "30.0 s" in text  # round times and the deadline, in s
    assert "0.712" in text and "0.761" in text and "0.723" in text and "+0.188" in text  # exact, DP mean, per site, change
    assert "3.000" in text and "4.93e-04" in text  # epsilon (lifetime, reported) and the site's delta
    assert "DP-SGD (model update)" in text and "Gaussian release: evaluation metrics" in text
    assert "2.870" in text and "0.729" in text and "all mechanisms, this run (composed, RDP)" in text
    assert "lifetime: this run and 1 earlier run(s)" in text
    assert "policy: target epsilon 3 over max_epsilon 2" in text and "update norm 1.2e+04" in text
    assert "evaluation declined: Hungary (node 12): policy: local evaluation is off" in text
    assert "within target" in text and "ledger matches the reported ε" in text
    assert "accuracy (fraction of test records classified correctly" in text  # metric with its unit
    assert '<img src="metric.png"' in page
    assert_no_raw_json(page)


def test_deployment_page_secagg_drops_resumes_and_stop():
    page = R.render_run_page(deployment_results(), [], "mae-ratio")
    assert 'class="error"' not in page
    text = " ".join(visible_text(page).split())
    assert "after 2 of 5 rounds" in text and "stopped: round 3: SecAgg+" in text and 'status warn' in page
    assert "on (SecAgg+, 3 shares, threshold 2)" in text and "120 s" in text
    assert "SecAgg+ stages: setup 3.10 s, share-keys 2.20 s, collect 6.00 s, unmask 2.90 s" in text
    assert "no reply (unmask stage): node 6: deadline 30 s passed" in text
    assert "secure aggregate rejected: aggregate update is not finite" in text
    assert "secure aggregate (all nodes)" in text and "budget: epsilon 8.4 would exceed max_epsilon 8" in text
    assert "run ended: round 3" in text
    assert "7002" in text and "2026-12-03T10:00:00Z" in text  # the resume link
    assert "0.910" in text and "0.880" in text  # mae_ratio spelled with an underscore
    assert "MAE ratio (model MAE ÷ MAE of the best naive forecast" in text
    assert "ledgers are not in this run folder" in text and "ε reported by the node" in text
    assert "fl-server audit verify" in text
    assert_no_raw_json(page)


@pytest.mark.parametrize("res", [
    {}, {"rounds": None, "config": None}, {"status": None, "rounds": [{"round": 1}]},
    {"rounds": [{"round": 1, "train": {"nodes": {"3": {"epsilon": "inf"}}}, "evaluate": None}], "refused": [{}],
     "excluded": "not a list", "dropped": [{"round": 1}], "resumes": [{}], "initial": {"central-sites": None}},
    {"run_id": 5, "status": "failed: boom", "config": {"dp": False, "num-rounds": 3}, "rounds": [
        {"round": 1, "train": {"nodes": {"1": {"num-examples": 10, "partition-id": 9}}, "accepted": 1, "seconds": None}}]},
])
def test_missing_or_odd_fields_never_crash_a_page(res):
    page = R.render_run_page(res, SITES, "accuracy")
    assert "<h2>Rounds</h2>" in page and "<h2>Refusals</h2>" in page and 'class="error"' not in page
    assert_no_raw_json(page)


def test_a_section_that_fails_is_replaced_by_a_note(monkeypatch, caplog):
    def boom(results, ctx):
        raise KeyError("surprise")

    monkeypatch.setattr(R, "section_sites", boom)
    with caplog.at_level(logging.ERROR, logger="server.report"):
        page = R.render_run_page(sim_results(), SITES, "accuracy")
    assert "This section could not be rendered" in page and "<h2>Rounds</h2>" in page and "<h2>Audit</h2>" in page
    assert "section_sites" not in page and any("not rendered" in r.message for r in caplog.records)


def test_compare_page_per_site_gain_and_links(tmp_path):
    page = R.render_compare_page(compare_results(), "accuracy", run_links={"federated": "federated/report.html"})
    assert 'class="error"' not in page
    text = " ".join(visible_text(page).split())
    assert "local-only (each site alone)" in text and "federated with DP at ε = 3" in text
    assert "0.762" in text and "0.792" in text and "+0.030" in text  # federated − local = +0.0297
    assert "0.733" in text and "-0.030" in text and "2.994" in text  # DP: gain −0.0297, ε spent
    assert 'href="federated/report.html"' in page and "16.2 s" in text and "budget spent" in text
    assert_no_raw_json(page)
    # lower-is-better metrics flip the sign of the gain
    rows = [{"method": m, "epsilon": None, "site": "s1", "metrics": {"mae-ratio": v}} for m, v in (("local", 1.0), ("federated", 0.8))]
    page = R.render_compare_page({"meta": {}, "rows": rows}, "mae-ratio")
    assert "+0.200" in visible_text(page)


# -- files: plots, ledgers, audit log, failures --------------------------------------------
def test_write_report_from_an_old_results_json(tmp_path):
    """An older results.json (no config, initial, dropped, timings) still gets plots and a page."""
    (tmp_path / "results.json").write_text(json.dumps({"run_id": "old", "rounds": [
        {"round": 1, "train": {"nodes": {"1": {"epsilon": 1.0, "partition-id": 0}}, "accepted": 1}}],
        "refused": [], "excluded": []}))
    out = R.write_report(tmp_path, SITES, "accuracy")
    page = out.read_text()
    assert (tmp_path / "metric.png").exists() and (tmp_path / "epsilon.png").exists()
    assert "<h2>Rounds</h2>" in page and 'class="error"' not in page
    assert_no_raw_json(page)


def test_write_report_compare_folder(tmp_path):
    (tmp_path / "federated").mkdir()
    (tmp_path / "federated" / "report.html").write_text("x")
    (tmp_path / "results.json").write_text(json.dumps(compare_results()))
    page = R.write_report(tmp_path, SITES, "accuracy").read_text()
    assert "cityfed comparison: health" in page and (tmp_path / "compare.png").exists()
    assert 'href="federated/report.html"' in page and 'href="federated-dp-eps3/report.html"' not in page


def test_ledgers_give_epsilon_and_delta_per_site_and_mechanism(tmp_path):
    from privacy.ledger import PrivacyLedger, Release, rdp_epsilon

    led = PrivacyLedger(tmp_path / "ledgers" / "health-Cleveland.sqlite")
    delta = 4.9e-4
    mk = lambda run, rnd, mech, noise, q, steps: Release(noise_multiplier=noise, sample_rate=q, steps=steps, delta=delta,
                                                         run_id=run, round=rnd, site="Cleveland", department="health",
                                                         mechanism=mech)
    for r in (mk("old", 1, "dp-sgd", 1.0, 0.1, 10), mk("r1", 1, "dp-sgd", 1.2, 0.14, 14), mk("r1", 1, "gaussian-eval", 10.0, 1.0, 2),
              mk("r1", 2, "dp-sgd", 1.2, 0.14, 14)):
        led.commit(led.begin(r))
    led.abort(led.begin(mk("r1", 3, "dp-sgd", 1.2, 0.14, 14)), "crashed")
    s = R.ledger_summary(R.read_ledgers(tmp_path / "ledgers"), "r1")["Cleveland"]
    assert s["delta"] == delta and s["other-runs"] == 1 and s["aborted"] == 1
    assert s["mechanisms"]["dp-sgd"]["releases"] == 2 and s["mechanisms"]["dp-sgd"]["steps"] == 28
    assert s["mechanisms"]["dp-sgd"]["epsilon"] == pytest.approx(rdp_epsilon([(1.2, 0.14, 28)], delta))
    assert s["mechanisms"]["gaussian-eval"]["epsilon"] == pytest.approx(rdp_epsilon([(10.0, 1.0, 2)], delta))
    assert s["run-epsilon"] == pytest.approx(rdp_epsilon([(1.2, 0.14, 28), (10.0, 1.0, 2)], delta))
    assert s["lifetime-epsilon"] == pytest.approx(led.epsilon("Cleveland", delta))
    assert R.read_ledgers(tmp_path / "nowhere") == []
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.sqlite").write_text("not a database")
    assert R.read_ledgers(tmp_path / "bad") == []  # logged and skipped


def test_coordinator_audit_log_result_on_the_page(tmp_path, monkeypatch):
    from privacy.audit import ENV_LOG, AuditLog

    log_path = tmp_path / "audit.jsonl"
    alog = AuditLog(log_path)
    alog.append("refused", **{"run-id": "sim-1", "round": 2, "node": 13, "reason": "policy"})
    monkeypatch.setenv(ENV_LOG, str(log_path))
    audit = R.coordinator_audit("sim-1")
    assert audit["ok"] and audit["entries"] == 1 and audit["refused"] == 1 and not audit["signatures"]
    text = " ".join(visible_text(R.render_run_page(sim_results(), SITES, "accuracy", audit=audit)).split())
    assert "verified" in text and "1 of 1 refusal(s), 0 of 1 exclusion(s)" in text
    log_path.write_text(log_path.read_text().replace("policy", "polica"))
    assert not R.coordinator_audit("sim-1")["ok"]
    monkeypatch.delenv(ENV_LOG)
    assert R.coordinator_audit("sim-1") is None


def test_a_report_failure_is_logged_and_never_raised(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="server.report"):
        assert R.write_report_safely(tmp_path / "missing", SITES, "accuracy") is None
    assert any("report.html not written" in r.message for r in caplog.records)
    (tmp_path / "results.json").write_text(json.dumps(sim_results()))
    assert R.write_report_safely(tmp_path, SITES, "accuracy") == tmp_path / "report.html"


def test_audit_counts_the_personalisation_the_node_reported_last():
    """A personalised DP run: the node's last reported epsilon is its personalise reply's, which the ledger holds.

    The audit compared the ledger (2.999 after the personalisation) with the last round's epsilon
    (2.01) and flagged every site of ``fl-sim run --personalise-epochs 30`` (README walk, 2026-12-05).
    """
    res = sim_results()
    res["personalise"] = {"asked": 2, "refused": [], "nodes": {"11": {"num-examples": 203, "epsilon": 2.9999,
                                                                      "noise-multiplier": 4.8, "steps": 120,
                                                                      "partition-id": 0}}}
    ledgers = {"Cleveland": {"delta": 4.926e-4, "deltas": [4.926e-4], "accountant": ["rdp"], "run-epsilon": 2.9999,
                             "lifetime-epsilon": 2.9999, "aborted": 0, "other-runs": 0,
                             "mechanisms": {"dp-sgd": {"releases": 2, "steps": 14, "noise": (1.25, 1.3),
                                                       "sample-rate": [0.1429], "replays": 0, "epsilon": 2.0},
                                            "personalisation": {"releases": 1, "steps": 120, "noise": (4.8, 4.8),
                                                                "sample-rate": [0.25], "replays": 0, "epsilon": 2.5}}}}
    page = R.render_run_page(res, SITES, "accuracy", plots={}, ledgers=ledgers)
    text = " ".join(visible_text(page).split())
    assert "ledger matches the reported ε" in text and "differs from the reported" not in text, text


def test_every_ledger_mechanism_has_a_label_people_read():
    """A new ledger mechanism (the record count, non-private rounds) is named in words in the report."""
    from privacy.ledger import MECHANISMS

    assert set(MECHANISMS) <= set(R.MECHANISM_LABELS), set(MECHANISMS) - set(R.MECHANISM_LABELS)
    assert all(label and label != m for m, label in R.MECHANISM_LABELS.items())


def test_a_failed_page_write_keeps_the_previous_report_whole(tmp_path, monkeypatch):
    """A write that fails part-way (disk full, a kill) leaves the earlier report.html as it was.

    On 8d95eb7 the page was written in place: a failure after the first bytes left a truncated
    report.html that browsers show as the run's report (LOW, bad-input review of 2026-12-07).
    """
    import builtins
    import errno
    import io

    (tmp_path / "results.json").write_text(json.dumps(sim_results()))
    first = R.write_report(tmp_path, SITES, "accuracy").read_text()

    class HalfWriter:
        """A file that takes half of what is written, then fails as a full disk does."""

        def __init__(self, fh):
            self._fh = fh

        def write(self, data):
            self._fh.write(data[: len(data) // 2])
            self._fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()
            return False

    real_open, real_io_open = builtins.open, io.open

    def failing(opener):
        def _open(file, mode="r", *args, **kwargs):
            fh = opener(file, mode, *args, **kwargs)
            if "w" in mode and "report.html" in str(file):
                return HalfWriter(fh)
            return fh
        return _open

    monkeypatch.setattr(builtins, "open", failing(real_open))
    monkeypatch.setattr(io, "open", failing(real_io_open))
    with pytest.raises(OSError):
        R.write_report(tmp_path, SITES, "accuracy")
    monkeypatch.undo()
    assert (tmp_path / "report.html").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir() if "report" in p.name) == ["report.html"]
