"""fl-sim: bad input of review round 2 (exit 2 before anything is trained or written; nothing lost).

* ``compare --epsilon`` (and ``baselines --epsilon/--model/--department``) given twice, or two
  values that name the same run (``federated-dp-eps{e:g}``): refused before any training (D1).
* An output file that these commands write at the end (OUT/results.json, the report, ...) that
  is a folder: refused with ``--out`` before any training (D3).
* ``CITYFED_FLWR_LOG``: any case accepted; a value that is not a level refused with exit 2 (D4).
* ``CITYFED_CPU_WATTS_PER_CORE`` checked before ``fl-sim run`` / ``compare`` train (D6).
* ``baselines -d health -d all``: 'all' cannot be combined (D12).
* An unknown command's suggestion is said once (D13).
"""

from __future__ import annotations

import logging

import pytest

import simulations.cli as cli
from sim_helpers import assert_input_error as _input_error
from sim_helpers import fl_sim as _fl_sim


@pytest.fixture()
def never_train(monkeypatch):
    """Every fl-sim command's training fails the test: the refusal must come first."""
    import simulations.baselines as baselines
    import simulations.compare as compare

    def never(*a, **k):
        raise AssertionError("trained before the input was checked")

    for mod, name in ((compare, "run_compare"), (compare, "run_baselines"), (compare, "simulate"),
                      (baselines, "run_baselines"), (cli, "_run_one")):
        monkeypatch.setattr(mod, name, never)


COMPARE = ["compare", "-d", "health", "--rounds", "1", "--local-epochs", "1", "--personalise-epochs", "0", "--no-loo",
           "--no-personalise-own"]


# -- D1: the same epsilon twice ----------------------------------------------------------------------------

@pytest.mark.parametrize("eps, shown", [
    (["3", "3"], "3.0 is given twice"),
    (["3", "3.0000001"], "3.0 and 3.0000001"),
    (["1", "3", "8", "3.0"], "3.0 is given twice"),
])
def test_compare_same_epsilon_twice_is_refused_before_training(tmp_path, capsys, monkeypatch, never_train, eps, shown):
    code, out, err = _fl_sim([*COMPARE, *[a for e in eps for a in ("-e", e)], "-o", tmp_path / "c"], capsys, monkeypatch)
    _input_error(code, out, err)
    assert "--epsilon" in err and shown in err and "federated-dp-eps3" in err, err
    assert "give each epsilon once" in err, err
    assert not (tmp_path / "c").exists()


def test_compare_distinct_epsilons_pass_the_check(tmp_path, capsys, monkeypatch):
    """3 and 3.00001 name different runs (eps3, eps3.00001): not refused."""
    import simulations.compare as compare

    seen = []

    def fake_compare(department, out, **k):
        seen.append(k["epsilons"])
        return {"meta": {"seconds": 1.0, "model": "heart-mlp"}, "summary": []}

    monkeypatch.setattr(compare, "run_compare", fake_compare)
    code, out, err = _fl_sim([*COMPARE, "-e", "3", "-e", "3.00001", "-o", tmp_path / "c"], capsys, monkeypatch)
    assert code == 0 and seen == [(3.0, 3.00001)], (out, err)


def test_run_compare_refuses_epsilons_that_name_the_same_run(tmp_path, monkeypatch):
    """The library refuses them too (another caller than fl-sim), before anything is created."""
    import simulations.compare as compare

    def never(*a, **k):
        raise AssertionError("trained before the input was checked")

    monkeypatch.setattr(compare, "run_baselines", never)
    monkeypatch.setattr(compare, "simulate", never)

    with pytest.raises(ValueError, match="federated-dp-eps3"):
        compare.run_compare("health", tmp_path / "c", epsilons=(3.0, 3.0000001), loo=False, own=False)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("args, option, shown", [
    (["-d", "health", "-e", "3", "-e", "3"], "--epsilon", "3.0 is given twice"),
    (["-d", "health", "-e", "3", "-e", "3.0000001"], "--epsilon", "3.0 and 3.0000001"),
    (["-d", "health", "-d", "health"], "--department", "'health' is given twice"),
    (["-d", "health", "-m", "heart-mlp", "-m", "heart-mlp"], "--model", "'heart-mlp' is given twice"),
])
def test_baselines_same_value_twice_is_refused(tmp_path, capsys, monkeypatch, never_train, args, option, shown):
    code, out, err = _fl_sim(["baselines", *args, "-o", tmp_path / "b"], capsys, monkeypatch)
    _input_error(code, out, err)
    assert f"error: {option}:" in err and shown in err and "give each" in err, err
    assert not (tmp_path / "b").exists()


# -- D3: an output file that is a folder -----------------------------------------------------------------

@pytest.mark.parametrize("blocker", ["results.json", "results.json.tmp", "report.html", "compare.png",
                                     "policies/health-no-dp.toml"])
def test_compare_output_file_that_is_a_folder_is_refused(tmp_path, capsys, monkeypatch, never_train, blocker):
    out_dir = tmp_path / "c"
    (out_dir / blocker).mkdir(parents=True)
    before = sorted(out_dir.rglob("*"))
    code, out, err = _fl_sim([*COMPARE, "-e", "3", "-o", out_dir], capsys, monkeypatch)
    _input_error(code, out, err)
    assert "error: --out:" in err and f"{out_dir / blocker} is a folder" in err, err
    assert sorted(out_dir.rglob("*")) == before


@pytest.mark.parametrize("blocker", ["policies", "federated", "federated-dp-eps3"])
def test_compare_output_folder_that_is_a_file_is_refused(tmp_path, capsys, monkeypatch, never_train, blocker):
    """A file where compare makes a folder: refused, also with --overwrite (it would remove folders only)."""
    out_dir = tmp_path / "c"
    out_dir.mkdir()
    (out_dir / blocker).write_text("keep")
    code, out, err = _fl_sim([*COMPARE, "-e", "3", "--overwrite", "-o", out_dir], capsys, monkeypatch)
    _input_error(code, out, err)
    assert "error: --out:" in err and f"{out_dir / blocker} is a file" in err, err
    assert (out_dir / blocker).read_text() == "keep" and len(list(out_dir.iterdir())) == 1


def test_compare_leave_one_out_folder_that_is_a_file_is_refused(tmp_path, capsys, monkeypatch, never_train):
    out_dir = tmp_path / "c"
    out_dir.mkdir()
    (out_dir / "loo-without-Cleveland").write_text("keep")
    argv = [a for a in COMPARE if a != "--no-loo"]
    code, out, err = _fl_sim([*argv, "-e", "3", "-o", out_dir], capsys, monkeypatch)
    _input_error(code, out, err)
    assert "error: --out:" in err and f"{out_dir / 'loo-without-Cleveland'} is a file" in err, err


def test_compare_all_departments_checks_every_department_before_the_first(tmp_path, capsys, monkeypatch, never_train):
    """-d all: utility's OUT/utility/results.json is a folder: refused before health trains."""
    out_dir = tmp_path / "c"
    (out_dir / "utility" / "results.json").mkdir(parents=True)
    argv = ["compare", "-d", "all", "--rounds", "1", "--no-loo", "-e", "3", "-o", out_dir]
    code, out, err = _fl_sim(argv, capsys, monkeypatch)
    _input_error(code, out, err)
    assert f"{out_dir / 'utility' / 'results.json'} is a folder" in err, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["utility"]


def test_compare_all_departments_finds_an_earlier_run_folder_before_the_first(tmp_path, capsys, monkeypatch,
                                                                            never_train):
    """-d all: an earlier comparison's traffic/federated (spent ledgers) is found before health trains."""
    out_dir = tmp_path / "c"
    (out_dir / "traffic" / "federated").mkdir(parents=True)
    argv = ["compare", "-d", "all", "--rounds", "1", "--no-loo", "-e", "3", "-o", out_dir]
    code, out, err = _fl_sim(argv, capsys, monkeypatch)
    _input_error(code, out, err)
    assert "error: --out:" in err and "federated" in err and "--overwrite" in err, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["traffic"]


@pytest.mark.parametrize("blocker", ["results.json", "results.json.tmp"])
def test_baselines_output_file_that_is_a_folder_is_refused(tmp_path, capsys, monkeypatch, never_train, blocker):
    out_dir = tmp_path / "b"
    (out_dir / blocker).mkdir(parents=True)
    code, out, err = _fl_sim(["baselines", "-d", "health", "--epochs", "1", "-e", "3", "-o", out_dir], capsys,
                             monkeypatch)
    _input_error(code, out, err)
    assert "error: --out:" in err and f"{out_dir / blocker} is a folder" in err, err
    assert [p.name for p in out_dir.iterdir()] == [blocker]


def test_write_results_leaves_no_temporary_file_when_it_fails(tmp_path):
    from simulations.baselines import write_results

    (tmp_path / "results.json").mkdir()
    with pytest.raises(OSError):
        write_results([], tmp_path, {})
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_compare_writes_results_json_whole_or_not_at_all(tmp_path, monkeypatch):
    """run_compare writes results.json through a temporary file: a failed write (disk full) leaves the earlier file
    as it was, and no temporary file."""
    import errno

    import simulations.compare as compare
    import simulations.report as report

    for name in ("_fed_rows", "_personalised_rows", "summarise"):
        monkeypatch.setattr(compare, name, lambda *a, **k: [])
    monkeypatch.setattr(compare, "run_baselines", lambda *a, **k: [])
    monkeypatch.setattr(compare, "per_site_value", lambda *a, **k: {})
    monkeypatch.setattr(report, "write_report_safely", lambda *a, **k: None)
    monkeypatch.setattr(compare, "simulate", lambda cfg, **k: {"status": "completed", "rounds": [], "refused": []})
    out = tmp_path / "c"
    out.mkdir()
    (out / "results.json").write_text("earlier")
    import os

    def disk_full(fd):  # the text is in the temporary file, then the disk is full when it is flushed
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        compare.run_compare("health", out, epsilons=(3.0,), loo=False, own=False)
    monkeypatch.undo()
    assert (out / "results.json").read_text() == "earlier"
    assert not list(out.glob("*.tmp"))


# -- D4: CITYFED_FLWR_LOG ------------------------------------------------------------------------------------

@pytest.fixture()
def flwr_level():
    """The ``flwr`` logger's level, set back after the test."""
    flwr = logging.getLogger("flwr")
    before = flwr.level
    yield flwr
    flwr.setLevel(before)


@pytest.fixture()
def main_env(monkeypatch, flwr_level):
    """fl-sim's main() with its environment changes undone and run_app replaced (records the call)."""
    import warnings

    import privacy.safe_cli as safe_cli
    from privacy import SEED_FROM_JOB_ENV

    for var in ("FLWR_TELEMETRY_ENABLED", "PYTHONWARNINGS", SEED_FROM_JOB_ENV):
        monkeypatch.setenv(var, "")
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    ran = []
    monkeypatch.setattr(safe_cli, "run_app", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(cli.sys, "argv", ["fl-sim", "datasets", "health"])
    return ran


@pytest.mark.parametrize("value", ["BOGUS", "verbose", "10", "WARNING x"])
def test_flwr_log_not_a_level_is_refused_without_traceback(monkeypatch, capsys, main_env, value):
    monkeypatch.setenv("CITYFED_FLWR_LOG", value)
    with pytest.raises(SystemExit) as ex:
        cli.main()
    err = " ".join(capsys.readouterr().err.split())
    assert ex.value.code == 2, err
    assert f"CITYFED_FLWR_LOG={value!r}" in err and "not a log level" in err, err
    assert "fix:" in err and "DEBUG, INFO, WARNING, ERROR" in err and "unset it" in err, err
    assert "Traceback" not in err and main_env == []


@pytest.mark.parametrize("value, level", [("debug", logging.DEBUG), ("Info", logging.INFO), (" error ", logging.ERROR),
                                          ("", logging.WARNING)])
def test_flwr_log_level_in_any_case_is_accepted(monkeypatch, main_env, value, level):
    monkeypatch.setenv("CITYFED_FLWR_LOG", value)
    cli.main()
    assert len(main_env) == 1 and logging.getLogger("flwr").level == level


def test_configure_flower_logger_names_the_allowed_levels(flwr_level):
    from flower_compat.logging import configure_flower_logger

    flwr = flwr_level
    configure_flower_logger("debug")
    assert flwr.level == logging.DEBUG
    with pytest.raises(ValueError, match="'BOGUS': not a log level.*DEBUG, INFO, WARNING, ERROR"):
        configure_flower_logger("BOGUS")


# -- D6: CITYFED_CPU_WATTS_PER_CORE ------------------------------------------------------------------------

RUN = ["run", "-d", "health", "--engine", "inprocess", "-r", "1"]


@pytest.mark.parametrize("command", [RUN, [*COMPARE, "-e", "3"], ["run", "-d", "all", "--engine", "inprocess", "-r", "1"]])
@pytest.mark.parametrize("value", ["nan", "abc", "-1", "0", "inf"])
def test_bad_cpu_watts_per_core_is_refused_before_training(tmp_path, capsys, monkeypatch, never_train, command, value):
    monkeypatch.setenv("CITYFED_CPU_WATTS_PER_CORE", value)
    code, out, err = _fl_sim([*command, "-o", tmp_path / "o"], capsys, monkeypatch)
    _input_error(code, out, err)
    assert f"$CITYFED_CPU_WATTS_PER_CORE={value!r}" in err and "positive number" in err, err
    assert not (tmp_path / "o").exists()


def test_good_cpu_watts_per_core_passes_the_check(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CITYFED_CPU_WATTS_PER_CORE", "5.5")
    seen = []

    def fake_run(d, cfg, out, engine, ray_options=None):
        seen.append(d)
        return {"status": "completed", "rounds": [{"round": 1, "train": {"accepted": 4}}], "config": cfg}

    monkeypatch.setattr(cli, "_run_one", fake_run)
    code, out, err = _fl_sim([*RUN, "-o", tmp_path / "o"], capsys, monkeypatch)
    assert code == 0 and seen == ["health"], (out, err)


# -- D12: 'all' with another department ------------------------------------------------------------------

def test_baselines_all_with_another_department_is_refused_as_such(tmp_path, capsys, monkeypatch, never_train):
    code, out, err = _fl_sim(["baselines", "-d", "health", "-d", "all", "-o", tmp_path / "b"], capsys, monkeypatch)
    _input_error(code, out, err)
    assert "error: --department:" in err and "'all' cannot be combined with other departments" in err, err
    assert "unknown department" not in err, err
    assert not (tmp_path / "b").exists()


# -- D13: an unknown command ---------------------------------------------------------------------------------

def test_unknown_command_suggestion_is_said_once(capsys, monkeypatch):
    code, out, err = _fl_sim(["report"], capsys, monkeypatch)
    _input_error(code, out, err)
    assert "No such command 'report'" in err and err.count("Did you mean") == 1, err


# -- D3 (the same class in fl-sim run) ------------------------------------------------------------------------

@pytest.mark.parametrize("blocker", ["results.json", "model.safetensors", "checkpoint.safetensors.tmp", "report.html",
                                     "epsilon.png"])
@pytest.mark.parametrize("departments", ["health", "all"])
def test_run_output_file_that_is_a_folder_is_refused(tmp_path, capsys, monkeypatch, never_train, blocker, departments):
    """A folder at OUT/results.json was found after the run had trained (its nodes had spent their budget), exit 1."""
    out_dir = tmp_path / "r"
    where = out_dir / ("utility" if departments == "all" else "") / blocker
    where.mkdir(parents=True)
    before = sorted(out_dir.rglob("*"))
    code, out, err = _fl_sim(["run", "-d", departments, "--engine", "inprocess", "-r", "1", "-o", out_dir], capsys,
                             monkeypatch)
    _input_error(code, out, err)
    assert "error: --out:" in err and f"{where} is a folder, not a file" in err, err
    assert sorted(out_dir.rglob("*")) == before


@pytest.mark.parametrize("blocker", ["ledgers", "policies"])
def test_run_output_folder_that_is_a_file_is_refused(tmp_path, capsys, monkeypatch, never_train, blocker):
    out_dir = tmp_path / "r"
    out_dir.mkdir()
    (out_dir / blocker).write_text("keep")
    code, out, err = _fl_sim(["run", "-d", "health", "--engine", "inprocess", "-r", "1", "--site-metrics", "dp",
                              "-o", out_dir], capsys, monkeypatch)
    _input_error(code, out, err)
    assert "error: --out:" in err and f"{out_dir / blocker} is a file, not a folder" in err, err
    assert (out_dir / blocker).read_text() == "keep" and len(list(out_dir.iterdir())) == 1
