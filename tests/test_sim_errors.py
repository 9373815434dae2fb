"""fl-sim's exit status: one rule for every error (README, fl-sim's ``--help``).

* 2: input the user can fix (an option, ``--out``, a ``--data`` or ``--ranges`` file, a policy):
  one ``error: WHAT; fix: HOW`` on standard error naming the option or file (and column), never a
  record's cell value, before anything is created or trained; a data file whose error is only
  found when its sites' arrays are built (a hospital with one patient) included.
* 1: the run failed, not through its input (no node's update accepted, an unexpected error: its
  type and place, "Run again with --debug").
* ``--debug`` adds the traceback (without local variables), the exit status stays.

The run config's numbers are checked once, by the run config's own rules
(``server.app.settings``), and a refusal names the fl-sim option the user typed.
"""

from __future__ import annotations

import csv

import pytest
from typer.testing import CliRunner

import simulations.cli as cli
from privacy.safe_cli import DEBUG_ENV, run_app

#: A value only the one-patient hospital's record holds (it must never be printed).
MARKER = "271.125"
#: Text planted in a numeric cell (it must never be printed either).
TEXT_MARKER = "MARKER4711"


def _hospital_file(tmp_path, tiny: dict | None = None, edit: dict | None = None):
    """The bundled health records as an operator CSV; ``tiny``: add a one-patient hospital; ``edit``: change row 1."""
    from citydata import load_department

    path = load_department("health").export(tmp_path / "health.csv")
    rows = list(csv.DictReader(open(path)))
    if edit:
        rows[0] = {**rows[0], **edit}
    if tiny:
        rows.append({**rows[0], "id": "9999", **tiny})
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture()
def never_train(monkeypatch):
    """Training fails the test: every error here is found before it."""
    import simulations.baselines as baselines
    import simulations.compare as compare

    def never(*a, **k):
        raise AssertionError("trained before the input was checked")

    monkeypatch.setattr(compare, "run_compare", never)
    monkeypatch.setattr(baselines, "run_baselines", never)
    monkeypatch.setattr(cli, "_run_one", never)


def _fl_sim(argv, capsys, monkeypatch):
    """fl-sim as its console script runs it (privacy.safe_cli.run_app): (exit status, stdout, stderr)."""
    monkeypatch.setenv(DEBUG_ENV, "0")  # --debug sets it to "1": undone after the test
    with pytest.raises(SystemExit) as ex:
        run_app(cli.app, "fl-sim", argv=[str(a) for a in argv])
    cap = capsys.readouterr()
    return ex.value.code, " ".join(cap.out.split()), " ".join(cap.err.split())


def _one_input_error(code: int, out: str, err: str) -> None:
    """Exit 2 with exactly one ``error: ...; fix: ...`` on stderr (after any data-quality warnings), none on stdout.

    A message of a shared module that carries its own fix (a policy file's ``... . Fix: ...``) is
    printed as it is: ``fix:`` in any case.
    """
    assert code == 2, (out, err)
    assert err.count("error: ") == 1, err
    line = err[err.index("error: "):]
    assert err.startswith("error: ") or err.startswith("fl-sim: warning: "), err
    assert "; fix: " in line or ". Fix: " in line, line
    assert "error" not in out.lower(), out
    assert "Run again with --debug" not in err and "not shown" not in err and "Usage:" not in err, err


# -- data files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("debug", [False, True])
def test_a_site_that_cannot_train_is_an_input_error(tmp_path, capsys, monkeypatch, never_train, debug):
    """Found when the sites' arrays are built (after the file loaded): exit 2, file + column + fix, no record."""
    data = _hospital_file(tmp_path, tiny={"dataset": "Tiny", "chol": MARKER})
    code, out, err = _fl_sim(["baselines", "-d", "health", "--data", data, "-o", tmp_path / "out",
                              *(["--debug"] if debug else [])], capsys, monkeypatch)
    assert code == 2, (out, err)
    assert f"--data: {data}, column 'dataset': hospital 'Tiny' has only 1 patient" in err, err
    assert "; fix: " in err and "Run again with --debug" not in err
    assert MARKER not in out + err  # neither the message nor the traceback shows the record
    assert ("Traceback" in err) == debug
    if not debug:
        _one_input_error(code, out, err)
    assert not (tmp_path / "out").exists()


def test_a_file_that_does_not_load_is_an_input_error(tmp_path, capsys, monkeypatch, never_train):
    data = _hospital_file(tmp_path, edit={"chol": TEXT_MARKER})
    code, out, err = _fl_sim(["baselines", "-d", "health", "--data", data, "-o", tmp_path / "out"], capsys, monkeypatch)
    _one_input_error(code, out, err)
    assert f"--data: {data}, column 'chol'" in err and TEXT_MARKER not in out + err, err


def test_the_app_itself_exits_2_on_a_bad_data_file(tmp_path, never_train):
    """Not only through run_app: the typer app (CliRunner, embedding) gives the same status and message."""
    data = _hospital_file(tmp_path, tiny={"dataset": "Tiny", "chol": MARKER})
    res = CliRunner().invoke(cli.app, ["baselines", "-d", "health", "--data", str(data), "-o", str(tmp_path / "out")],
                             env={"COLUMNS": "200"})
    text = " ".join(res.output.split())
    assert res.exit_code == 2, text
    assert "error: --data:" in text and "hospital 'Tiny' has only 1 patient" in text and "; fix: " in text, text
    assert MARKER not in text


def test_a_ranges_file_error_names_the_option(tmp_path, capsys, monkeypatch, never_train):
    data = _hospital_file(tmp_path)
    ranges = tmp_path / "ranges.toml"
    ranges.write_text("[chol]\nmax = 10\n")  # every cholesterol is now out of range
    code, out, err = _fl_sim(["baselines", "-d", "health", "--data", data, "--ranges", ranges, "-o", tmp_path / "out"],
                             capsys, monkeypatch)
    _one_input_error(code, out, err)
    assert "column 'chol'" in err and "above 10" in err, err


# -- options ----------------------------------------------------------------------------------------

def _afile(tmp_path):
    p = tmp_path / "afile"
    p.write_text("x")
    return p


@pytest.mark.parametrize("argv, words", [
    (["run", "-d", "health", "--lr", "0"], ["--lr"]),
    (["run", "-d", "health", "--seed", "-5"], ["--seed", "-5 is not in the range", "fix: see 'fl-sim run --help'"]),
    (["run", "-d", "health", "--rounds", "abc"], ["--rounds", "'abc' is not a valid integer"]),
    (["run", "-d", "health", "--no-such-option"], ["No such option", "--no-such-option"]),
    (["run", "--engine", "inprocess"], ["Missing option", "--department"]),
    (["run", "-d", "police"], ["--department", "choose from health, traffic, utility or 'all'"]),
    (["run", "-d", "health", "--engine", "rey"], ["--engine", "ray or inprocess"]),
    (["run", "-d", "health", "--secagg", "--strategy", "krum"], ["run config 'strategy'", "'secagg' = true",
                                                                  "--strategy and --secagg:", "fix: change --strategy or --secagg"]),
    # options that cannot go together are named as typed (docs review 2026-12-07, L10: the fix named run-config keys)
    (["run", "-d", "health", "--central-dp", "--strategy", "fedadam"], ["--strategy and --central-dp:",
                                                                         "fix: change --strategy or --central-dp"]),
    (["run", "-d", "health", "-e", "20"], ["--epsilon", "every node would refuse"]),
    (["run", "-d", "health", "--policy", "nope.toml"], ["--policy", "cannot read policy file"]),
    (["compare", "-d", "health", "--model", "gru"], ["--model", "not a health model"]),
    (["compare", "-d", "health", "--engine", "rey"], ["--engine"]),
    (["baselines", "-d", "health", "--epsilon", "nan"], ["--epsilon", "(got nan)"]),
    (["baselines", "-d", "health", "--date-format", "nope"], ["--date-format", "unknown date format"]),
    (["baselines", "-d", "police"], ["--department", "police"]),
    (["baselines", "-d", "health", "--test-start", "2024-01-01"], ["--test-start", "not split in time"]),
    (["baselines", "-d", "traffic", "--test-start", "2024-05-07"], ["--test-start", "bundled sites have their own"]),
    (["baselines", "-d", "utility", "--data", "own.csv", "--test-start", "7 May"], ["--test-start", "is not a date"]),
    (["no-such-command"], ["No such command"]),
])
def test_every_input_error_is_one_error_line_with_a_fix(tmp_path, capsys, monkeypatch, never_train, argv, words):
    cmd = argv[0]
    more = [] if cmd == "no-such-command" else ["-o", tmp_path / "out"]
    more += ["--engine", "inprocess"] if cmd == "run" and "--engine" not in argv else []
    code, out, err = _fl_sim([*argv, *more], capsys, monkeypatch)
    _one_input_error(code, out, err)
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cmd", ["run", "compare", "baselines"])
def test_out_is_a_file_is_one_error_line(tmp_path, capsys, monkeypatch, never_train, cmd):
    code, out, err = _fl_sim([cmd, "-d", "health", "-o", _afile(tmp_path)], capsys, monkeypatch)
    _one_input_error(code, out, err)
    assert "--out" in err and "is a file" in err, err


def test_export_errors_are_one_error_line(tmp_path, capsys, monkeypatch):
    code, out, err = _fl_sim(["export", "-d", "health", "-o", tmp_path / "x.txt"], capsys, monkeypatch)
    _one_input_error(code, out, err)
    assert "--out" in err and ".csv or .parquet" in err, err
    code, out, err = _fl_sim(["export", "-d", "health", "--site", "Atlantis", "-o", tmp_path / "x.csv"], capsys, monkeypatch)
    _one_input_error(code, out, err)
    assert "--site" in err and "Atlantis" in err and "Cleveland" in err, err


# -- the run config's numbers: its own rules, under the option's name --------------------------------

def _run_config_message(key: str, value: float) -> str:
    from server.app import RunConfigError, settings

    with pytest.raises(RunConfigError) as info:
        settings({"department": "health", key: value})
    return str(info.value)


@pytest.mark.parametrize("option, key, value", [
    ("--epsilon", "target-epsilon", "inf"), ("--epsilon", "target-epsilon", "0"), ("--lr", "lr", "0"),
    ("--lr", "lr", "1e9"), ("--server-lr", "server-lr", "inf"), ("--proximal-mu", "proximal-mu", "-1"),
    ("--clip", "clipping-norm", "0"), ("--fraction", "fraction-train", "0"), ("--fraction", "fraction-train", "2"),
    ("--fraction-evaluate", "fraction-evaluate", "nan"), ("--central-noise", "central-noise-multiplier", "0"),
    ("--central-clip", "central-clipping-norm", "inf"), ("--central-delta", "central-delta", "1"),
    ("--personalise-lr", "personalise-lr", "0"), ("--personalise-own-lr", "personalise-own-lr", "-1"),
    ("--noise-multiplier", "noise-multiplier", "nan"),
])
def test_fl_sim_run_numbers_are_refused_by_the_run_configs_own_rule(tmp_path, capsys, monkeypatch, never_train,
                                                                      option, key, value):
    code, out, err = _fl_sim(["run", "-d", "health", "--engine", "inprocess", "-o", tmp_path / "out", option, value],
                             capsys, monkeypatch)
    _one_input_error(code, out, err)
    assert f"error: {option}: " in err and _run_config_message(key, float(value)) in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, option, key, value", [
    (["compare", "-d", "health"], "--personalise-lr", "personalise-lr", "0"),
    (["compare", "-d", "health"], "--epsilon", "target-epsilon", "-1"),
    (["baselines", "-d", "health"], "--epsilon", "target-epsilon", "1e308"),
    (["baselines", "-d", "health"], "--max-grad-norm", "clipping-norm", "-1"),
])
def test_compare_and_baselines_numbers_use_the_run_configs_rule(tmp_path, capsys, monkeypatch, never_train,
                                                                 argv, option, key, value):
    code, out, err = _fl_sim([*argv, "-o", tmp_path / "out", option, value], capsys, monkeypatch)
    _one_input_error(code, out, err)
    assert f"error: {option}: " in err and _run_config_message(key, float(value)) in err, err


def test_noise_multiplier_minus_one_is_not_an_option_value(tmp_path, capsys, monkeypatch, never_train):
    """-1 means 'calibrate' in the run config; on the command line leaving the option out says that."""
    code, out, err = _fl_sim(["run", "-d", "health", "--engine", "inprocess", "-o", tmp_path / "out",
                              "--noise-multiplier", "-1"], capsys, monkeypatch)
    _one_input_error(code, out, err)
    assert "--noise-multiplier" in err and "must be a finite number >= 0" in err and "leave --noise-multiplier out" in err


def test_the_option_map_names_real_keys_and_options():
    import typer.main

    from server.app import RunSettings

    keys = {f.alias or k for k, f in RunSettings.model_fields.items()}
    assert set(cli.RUN_CONFIG_OPTIONS) <= keys
    group = typer.main.get_command(cli.app)
    opts = {o for c in ("run", "compare") for p in group.commands[c].params for o in p.opts}
    assert set(cli.RUN_CONFIG_OPTIONS.values()) <= opts
    import inspect

    src = inspect.getsource(cli)  # the run config's bounds are not restated here
    assert all(name not in src for name in ("MAX_LR", "MAX_EPSILON", "MAX_SCALE, 0"))


# -- failures that are not the input's: exit 1 --------------------------------------------------------

def test_an_unexpected_failure_during_a_run_exits_1(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError(f"a library quoting {MARKER}")

    monkeypatch.setattr(cli, "_run_one", boom)
    code, out, err = _fl_sim(["run", "-d", "health", "--engine", "inprocess", "-o", tmp_path / "out"], capsys, monkeypatch)
    assert code == 1 and "RuntimeError" in err and "Run again with --debug" in err, err
    assert MARKER not in out + err


def test_an_untrained_run_is_reported_on_stderr(capsys):
    refused = {"rounds": [{"round": 1, "train": {"accepted": 0}}], "refused": [], "excluded": [],
               "config": {"run-dir": "runs/x"}}
    assert cli._untrained("health", refused)
    cap = capsys.readouterr()
    err = " ".join(cap.err.split())
    assert err.startswith("error: health: no node's update was accepted") and "; fix: " in err and not cap.out


def test_help_documents_the_exit_status():
    res = CliRunner().invoke(cli.app, ["--help"], env={"COLUMNS": "200"})
    text = " ".join(res.output.split())
    assert res.exit_code == 0
    assert "Exit status" in text and "2 = " in text and "1 = " in text and "--debug" in text, text
