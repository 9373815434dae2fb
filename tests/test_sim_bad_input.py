"""fl-sim: bad input found by review (exit 2 before anything is trained or written; nothing lost).

* ``fl-sim run --min-accepted N`` with more than the nodes a round can have: refused before
  anything is trained (a DP budget is never spent on a run that cannot succeed).
* A run that stops early (a round with fewer acceptable updates than ``--min-accepted``) exits 1:
  the rounds asked for were not all run, and a script must be able to tell.
* ``fl-sim export -o FILE``: a missing folder is created; a folder, or a path under a file, is
  refused naming ``--out``; a failed write leaves an existing file as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import simulations.cli as cli
from sim_helpers import assert_input_error as _input_error
from sim_helpers import fl_sim as _fl_sim


@pytest.fixture()
def never_train(monkeypatch):
    def never(*a, **k):
        raise AssertionError("trained before the input was checked")

    monkeypatch.setattr(cli, "_run_one", never)


# -- A1 (a): more nodes required than a round can have ------------------------------------------------

@pytest.mark.parametrize("args, text", [
    (["-d", "health", "--min-accepted", "99"], "99 is more than the 4 node(s)"),
    (["-d", "health", "--min-accepted", "5"], "5 is more than the 4 node(s)"),
    (["-d", "health", "--fraction", "0.5", "--min-accepted", "3"], "3 is more than the 2 node(s)"),
    (["-d", "health", "--virtual-sites", "5", "--min-accepted", "6"], "6 is more than the 5 node(s)"),
    (["-d", "all", "--min-accepted", "4"], "utility"),
])
def test_min_accepted_above_the_nodes_of_a_round_is_refused_before_training(tmp_path, capsys, monkeypatch,
                                                                            never_train, args, text):
    code, out, err = _fl_sim(["run", "--engine", "inprocess", "-r", "1", "--local-epochs", "1", *args,
                              "-o", tmp_path / "out"], capsys, monkeypatch)
    _input_error(code, out, err)
    assert "--min-accepted" in err and text in err and "fix: --min-accepted" in err, err
    assert not (tmp_path / "out").exists()


def test_min_accepted_equal_to_the_sites_is_allowed(tmp_path, capsys, monkeypatch):
    """4 hospitals, --min-accepted 4: the check lets it through (to the run itself)."""
    seen = []

    def fake_run(d, cfg, out, engine, ray_options=None):
        seen.append(cfg["min-accepted"])
        return {"status": "completed", "rounds": [{"round": 1, "train": {"accepted": 4}}], "config": cfg}

    monkeypatch.setattr(cli, "_run_one", fake_run)
    code, out, err = _fl_sim(["run", "-d", "health", "--engine", "inprocess", "-r", "1", "--min-accepted", "4",
                              "-o", tmp_path / "out"], capsys, monkeypatch)
    assert code == 0 and seen == [4], (out, err)


# -- A1 (b): a run that stops early is not "done" ------------------------------------------------------

STOPPED = ("stopped: round 2: 1 acceptable update(s), fewer than min-accepted=2 (3 refusal(s), 0 exclusion(s) so "
           "far); global model unchanged, run ended")


def _fake_runs(monkeypatch, statuses: dict):
    """``_run_one`` returning, per department, a run that trained round 1 and then ended with ``statuses[d]``."""
    ran = []

    def fake_run(d, cfg, out, engine, ray_options=None):
        ran.append(d)
        status = statuses.get(d, "completed")
        rounds = [{"round": 1, "train": {"accepted": 4}}]
        if status != "completed":
            rounds.append({"round": 2, "train": {"accepted": 1}})
        return {"status": status, "rounds": rounds, "refused": [{"round": 2, "node": 3, "reason": "x: refused: budget"}],
                "excluded": [], "config": {**cfg, "num-rounds": 3}}

    monkeypatch.setattr(cli, "_run_one", fake_run)
    return ran


def test_a_run_that_stopped_early_exits_1(tmp_path, capsys, monkeypatch):
    _fake_runs(monkeypatch, {"health": STOPPED})
    code, out, err = _fl_sim(["run", "-d", "health", "--engine", "inprocess", "-r", "3", "--min-accepted", "2",
                              "-o", tmp_path / "out"], capsys, monkeypatch)
    assert code == 1, (out, err)
    assert err.count("error: ") == 1 and "; fix: " in err and "Traceback" not in err, err
    assert "health: the run stopped in round 2 of 3 (1 round(s) completed): 1 acceptable" in err and "fewer than min-accepted=2" in err, err
    assert "results.json" in err and "--min-accepted" in err, err


def test_all_departments_run_when_one_stops_early(tmp_path, capsys, monkeypatch):
    ran = _fake_runs(monkeypatch, {"traffic": STOPPED})
    code, out, err = _fl_sim(["run", "-d", "all", "--engine", "inprocess", "-r", "3", "-o", tmp_path / "out"],
                             capsys, monkeypatch)
    assert code == 1 and ran == ["health", "traffic", "utility"], (out, err)
    assert "traffic: the run stopped in round 2 of 3" in err and "health:" not in err, err


def test_a_completed_run_exits_0(tmp_path, capsys, monkeypatch):
    _fake_runs(monkeypatch, {})
    code, out, err = _fl_sim(["run", "-d", "health", "--engine", "inprocess", "-r", "1", "-o", tmp_path / "out"],
                             capsys, monkeypatch)
    assert code == 0 and "error" not in err, (out, err)


# -- A2: fl-sim export -o FILE --------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_creates_missing_folders(tmp_path, capsys, monkeypatch, suffix):
    out = tmp_path / "nodir" / "deeper" / f"x{suffix}"
    code, text, err = _fl_sim(["export", "-d", "health", "--site", "Cleveland", "-o", out], capsys, monkeypatch)
    assert code == 0, (text, err)
    assert out.is_file() and f"wrote {out}" in text, text
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left


@pytest.mark.parametrize("argv, hint", [
    (["-d", "traffic", "--site", "detector-3"], "load it with --test-start '2024-05-07 12:00'"),
    (["-d", "utility"], "england-wales-2000 2000-08-07 00:00; portugal-2012 2014-04-02 00:00; victoria-2014 2014-10-01 18:00"),
])
def test_export_of_a_forecasting_site_names_the_test_start_that_keeps_its_split(tmp_path, capsys, monkeypatch, argv, hint):
    """Reloading the exported file needs a test start (own forecasting files have no derived split): export says which."""
    from citydata import load_department

    out = tmp_path / "x.csv"
    code, text, err = _fl_sim(["export", *argv, "-o", out], capsys, monkeypatch)
    assert code == 0, (text, err)
    assert hint in " ".join(text.split()), text
    if argv[1] == "traffic":
        again = load_department("traffic", out, test_start="2024-05-07 12:00").site_data("detector-3")
        assert len(again.train) == len(load_department("traffic").site_data("detector-3").train)


@pytest.mark.parametrize("make, where", [
    (lambda p: (p / "afile").write_text("keep"), "afile/x.csv"),
    (lambda p: (p / "afile").write_text("keep"), "afile/sub/x.parquet"),
])
def test_export_under_a_file_is_refused(tmp_path, capsys, monkeypatch, make, where):
    make(tmp_path)
    code, out, err = _fl_sim(["export", "-d", "health", "-o", tmp_path / where], capsys, monkeypatch)
    _input_error(code, out, err)
    assert "--out" in err and f"{tmp_path / 'afile'}, which is a file" in err, err
    assert (tmp_path / "afile").read_text() == "keep"


def test_export_to_an_existing_folder_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "d.csv").mkdir()
    code, out, err = _fl_sim(["export", "-d", "health", "-o", tmp_path / "d.csv"], capsys, monkeypatch)
    _input_error(code, out, err)
    assert f"--out: {tmp_path / 'd.csv'} is a folder" in err and "fix: " in err, err
    assert list((tmp_path / "d.csv").iterdir()) == []


def test_export_refusal_creates_no_folder(tmp_path, capsys, monkeypatch):
    """A bad suffix or an unknown site is refused with the folder it would have created left uncreated."""
    for args in (["-o", tmp_path / "new" / "x.txt"], ["-o", tmp_path / "new" / "x.csv", "--site", "Atlantis"]):
        code, out, err = _fl_sim(["export", "-d", "health", *args], capsys, monkeypatch)
        _input_error(code, out, err)
        assert str(tmp_path / "new" / "x") in err or "--site" in err, err
        assert ".partial" not in err, err
        assert not (tmp_path / "new").exists()


def test_export_unwritable_folder_is_an_input_error_and_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    """A folder it cannot write in (root ignores permissions: the write is made to fail as it would)."""
    import pandas as pd

    out = tmp_path / "x.csv"
    out.write_text("earlier export\n")

    def denied(self, path, *a, **k):
        Path(path).write_text("half a file")
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", denied)
    code, text, err = _fl_sim(["export", "-d", "health", "-o", out], capsys, monkeypatch)
    _input_error(code, text, err)
    assert f"--out: cannot write {out}" in err and str(tmp_path) in err, err
    assert out.read_text() == "earlier export\n"  # nothing lost
    assert [p.name for p in tmp_path.iterdir()] == ["x.csv"]


def test_export_failed_write_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    """An unexpected failure mid-write (exit 1) leaves the file an earlier export wrote as it was."""
    import pandas as pd

    out = tmp_path / "x.csv"
    out.write_text("earlier export\n")

    def full(self, path, *a, **k):
        Path(path).write_text("half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    code, text, err = _fl_sim(["export", "-d", "health", "-o", out], capsys, monkeypatch)
    assert code == 1, (text, err)
    assert out.read_text() == "earlier export\n"
    assert [p.name for p in tmp_path.iterdir()] == ["x.csv"]


# -- A2: the other subcommands' --out folders ----------------------------------------------------------

def _training_refused(monkeypatch):
    """Every subcommand's training fails the test: the --out refusal comes first."""
    import simulations.baselines as baselines
    import simulations.compare as compare
    import simulations.mia as mia

    def never(*a, **k):
        raise AssertionError("ran before --out was checked")

    for mod, name in ((compare, "run_compare"), (baselines, "run_baselines"), (mia, "run_audit"), (cli, "_run_one")):
        monkeypatch.setattr(mod, name, never)


SUBCOMMANDS = {
    "run": ["run", "-d", "health", "--engine", "inprocess", "-r", "1"],
    "baselines": ["baselines", "-d", "health"],
    "compare": ["compare", "-d", "health"],
    "audit": ["audit", "-d", "health"],
    "export-model": ["export-model", "RUNDIR"],
    "export": ["export", "-d", "health"],
}


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_out_folder_that_cannot_be_written_is_refused(tmp_path, capsys, monkeypatch, command):
    """--out in (or under) a folder this user cannot write: exit 2 naming --out and the folder, nothing made.

    Root ignores permissions: ``os.access`` is made to answer as it would for another user.
    """
    import os

    _training_refused(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode, **k: False if str(p) == str(locked) else real(p, mode, **k))
    argv = [str(tmp_path) if a == "RUNDIR" else a for a in SUBCOMMANDS[command]]
    code, out, err = _fl_sim([*argv, "-o", locked / "new" / "run"], capsys, monkeypatch)
    _input_error(code, out, err)
    assert "--out" in err and f"cannot write in {locked}" in err, err
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_out_folder_under_a_file_is_refused(tmp_path, capsys, monkeypatch, command):
    _training_refused(monkeypatch)
    (tmp_path / "afile").write_text("keep")
    argv = [str(tmp_path) if a == "RUNDIR" else a for a in SUBCOMMANDS[command]]
    code, out, err = _fl_sim([*argv, "-o", tmp_path / "afile" / "run"], capsys, monkeypatch)
    _input_error(code, out, err)
    assert "--out" in err and f"{tmp_path / 'afile'}, which is a file" in err, err
    assert (tmp_path / "afile").read_text() == "keep"


def test_dropout_1_is_refused_before_training(tmp_path, capsys, monkeypatch, never_train):
    """--dropout 1: every site fails every round, a run that cannot train: refused, not run to exit 1."""
    code, out, err = _fl_sim(["run", "-d", "health", "--engine", "inprocess", "-r", "1", "--dropout", "1",
                              "-o", tmp_path / "out"], capsys, monkeypatch)
    _input_error(code, out, err)
    assert "--dropout" in err and "< 1 (got 1.0)" in err, err
    assert not (tmp_path / "out").exists()


# -- A1 (b) in fl-sim compare: a federated run of the comparison that stopped early ---------------------

def test_compare_records_a_federated_run_that_stopped(tmp_path, monkeypatch):
    """run_compare: meta["stopped"] names each federated run that ended before its last round (no training here)."""
    import simulations.compare as compare
    import simulations.report as report

    monkeypatch.setattr(compare, "run_baselines", lambda *a, **k: [])
    monkeypatch.setattr(compare, "_fed_rows", lambda *a, **k: [])
    monkeypatch.setattr(compare, "_personalised_rows", lambda *a, **k: [])
    monkeypatch.setattr(compare, "summarise", lambda *a, **k: [])
    monkeypatch.setattr(compare, "per_site_value", lambda *a, **k: {})
    monkeypatch.setattr(report, "write_report_safely", lambda *a, **k: None)

    def fake_simulate(cfg, **k):
        stopped = cfg["run-dir"].endswith("federated-dp-eps1")
        return {"status": STOPPED if stopped else "completed", "rounds": [], "refused": []}

    monkeypatch.setattr(compare, "simulate", fake_simulate)
    res = compare.run_compare("health", tmp_path / "cmp", epsilons=(1.0, 3.0), loo=False, own=False)
    assert res["meta"]["stopped"] == {"federated-dp-eps1": {"status": STOPPED, "num-rounds": 15}}  # health's default


def test_fl_sim_compare_exits_1_when_a_federated_run_stopped(tmp_path, capsys, monkeypatch):
    import simulations.compare as compare

    def fake_compare(department, out, **k):
        return {"meta": {"seconds": 1.0, "model": "heart-mlp", "stopped": {"federated-dp-eps1": {"status": STOPPED, "num-rounds": 8}}},
                "summary": []}

    monkeypatch.setattr(compare, "run_compare", fake_compare)
    code, out, err = _fl_sim(["compare", "-d", "health", "-o", tmp_path / "cmp"], capsys, monkeypatch)
    assert code == 1, (out, err)
    assert err.count("error: ") == 1 and "; fix: " in err, err
    assert "health: federated-dp-eps1: the run stopped in round 2 of 8" in err, err
    assert str(tmp_path / "cmp" / "federated-dp-eps1") in err and "--min-accepted" not in err, err


def test_node_failures_are_told_from_refusals_and_an_empty_round_shows_no_nan(tmp_path, capsys, monkeypatch):
    """A real run in which every node fails (--dropout): failures, not refusals; no 'nan' in the round table.

    Found by a review of the docs followed literally (2026-12-07, L12): the simulated failures were
    counted as "4 refusal(s)" and the round with no accepted update showed accuracy and eps max nan.
    """
    code, out, err = _fl_sim(["run", "-d", "health", "--engine", "inprocess", "-r", "2", "--dropout", "0.9",
                              "--min-accepted", "2", "--seed", "1", "-o", tmp_path / "out"], capsys, monkeypatch)
    text = " ".join((out + err).split())
    assert code == 1, text
    assert "(0 refusal(s), 4 node failure(s), 0 exclusion(s), 0 dropped)" in text, text
    assert "failed round 1 node" in text and "refused round" not in text, text
    assert "nan" not in out.lower(), out
