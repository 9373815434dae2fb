"""Bad run settings are refused up front, naming the key or option, the value and the fix.

The run config (``server.app.settings``: ``fl-server run -c``, fl-sim) refuses inf, nan and
out-of-range numbers with a cityfed error (its message is shown by ``privacy.safe_cli``); fl-sim
checks its options, the output folder, ``--resume`` and the nodes' policy before it loads data,
creates a folder or trains (exit 2), and exits 1 after a run in which no node's update was accepted.
"""

from __future__ import annotations

import os
import json
import math

import pytest

import simulations.cli as cli
from privacy.safe_cli import describe, run_app
from server import app as server_app
from server.app import DEFAULTS, RunConfigError, _ACCEPTS, _NUMBER_KIND, settings

INF, NAN = float("inf"), float("nan")


# -- the run config ------------------------------------------------------------------------------

def _bad_values(key: str) -> list:
    """Values every numeric key must refuse: non-finite, a bool, and one step past each bound."""
    name = next(k for k, f in server_app.RunSettings.model_fields.items() if (f.alias or k) == key)
    is_int = _NUMBER_KIND[name] is int
    vals = [True] + ([] if is_int else [INF, -INF, NAN])
    import annotated_types as at

    for m in server_app.RunSettings.model_fields[name].metadata:
        if isinstance(m, at.Ge):
            vals.append(m.ge - 1 if is_int else m.ge - 1e-9 * max(1, abs(m.ge)))
        if isinstance(m, at.Gt):
            vals.append(m.gt)
        if isinstance(m, at.Le):
            vals.append(m.le + 1 if is_int else m.le * 2)
        if isinstance(m, at.Lt):
            vals.append(m.lt)
    return vals


@pytest.mark.parametrize("key, value", [(k, v) for k in sorted(_ACCEPTS) for v in _bad_values(k)])
def test_every_numeric_key_refuses_nonfinite_and_out_of_range(key, value):
    with pytest.raises(RunConfigError) as err:
        settings({"department": "health", key: value})
    msg = str(err.value)
    assert msg.startswith(f"run config {key!r}: must be {_ACCEPTS[key]} (got ")
    assert "finite number" in msg or "whole number" in msg


def test_every_number_of_the_run_config_is_bounded():
    # a float without an upper bound may only be max-update-norm (a guard: huge = off, still finite)
    unbounded = sorted(k for k, v in _ACCEPTS.items() if "<" not in v)
    assert unbounded == ["max-update-norm"]
    assert set(_ACCEPTS) == {k for k, v in DEFAULTS.items() if type(v) in (int, float)}


@pytest.mark.parametrize("bad, text", [
    ({"target-epsilon": INF}, "run config 'target-epsilon': must be a finite number > 0 and <= 100 (got inf)"),
    ({"target-epsilon": 1e308}, "(got 1e+308)"),
    ({"noise-multiplier": -0.5}, "or -1 (the default) to calibrate the noise from 'target-epsilon' (got -0.5)"),
    ({"noise-multiplier": INF}, "run config 'noise-multiplier': must be a finite number >= 0"),
    ({"num-rounds": 99999999999999999999}, "run config 'num-rounds': must be a whole number >= 1 and <= 100000"),
    ({"seed": -5}, "run config 'seed': must be a whole number >= 0 and <= 4294967295 (got -5)"),
    ({"central-data-seed": -5}, "run config 'central-data-seed'"),
    ({"num-rounds": True}, "(got True)"),
    ({"strategy": "krum", "secagg": True}, "run config 'strategy'"),  # server.secagg's ValueError, re-raised as ours
    ({"round-timeout": "soon"}, "run config 'round-timeout': expected a number of seconds"),
])
def test_run_config_errors_are_cityfed_errors_naming_the_key(bad, text):
    with pytest.raises(RunConfigError) as err:
        settings({"department": "health", **bad})
    assert text in str(err.value)
    assert isinstance(err.value, ValueError)  # callers that catch ValueError still do
    assert describe(err.value).startswith("RunConfigError: run config")  # shown by safe_cli, not hidden


@pytest.mark.parametrize("value", [-1, -1.0, 0, 0.8, 1e6])
def test_noise_multiplier_accepts_calibrate_and_fixed(value):
    assert settings({"department": "health", "noise-multiplier": value})["noise-multiplier"] == value


# -- fl-sim: options checked before anything is loaded, created or trained --------------------------

def _fl_sim(argv, capsys, monkeypatch):
    """Run fl-sim as its console script does (privacy.safe_cli.run_app); (exit status, stdout + stderr)."""
    monkeypatch.setattr(cli.console, "width", 400)
    with pytest.raises(SystemExit) as ex:
        run_app(cli.app, "fl-sim", argv=[str(a) for a in argv])
    cap = capsys.readouterr()
    return ex.value.code, " ".join((cap.out + cap.err).split())


def _run(tmp_path, *args):
    return ["run", "-d", "health", "-r", "1", "--engine", "inprocess", "-o", tmp_path / "out", *args]


@pytest.mark.parametrize("args, option, text", [
    (["-e", "inf"], "--epsilon", "must be a finite number > 0 and <= 100 (got inf)"),
    (["-e", "nan"], "--epsilon", "(got nan)"),
    (["-e", "0"], "--epsilon", "(got 0.0)"),
    (["-e", "1e308"], "--epsilon", "(got 1e+308)"),
    (["--noise-multiplier", "-1"], "--noise-multiplier", "must be a finite number >= 0"),
    (["--noise-multiplier", "nan"], "--noise-multiplier", "(got nan)"),
    (["--noise-multiplier", "inf"], "--noise-multiplier", "(got inf)"),
    (["--batch-size", "0"], "--batch-size", "0 is not in the range"),
    (["--lr", "0"], "--lr", "must be a finite number > 0"),
    (["--lr", "nan"], "--lr", "(got nan)"),
    (["--seed", "-5"], "--seed", "-5 is not in the range 0<=x<=4294967295"),
    (["-r", "99999999999999999999"], "--rounds", "is not in the range"),
    (["--fraction", "nan"], "--fraction", "(got nan)"),
    (["--fraction", "0"], "--fraction", "must be a finite number > 0 and <= 1"),
    (["--dropout", "nan"], "--dropout", "(got nan)"),
    (["--clip", "inf"], "--clip", "(got inf)"),
    (["--proximal-mu", "-1"], "--proximal-mu", "(got -1.0)"),
    (["--server-lr", "inf"], "--server-lr", "(got inf)"),
    (["--central-noise", "nan"], "--central-noise", "(got nan)"),
    (["--central-delta", "1"], "--central-delta", "< 1 (got 1.0)"),
    (["--personalise-lr", "0"], "--personalise-lr", "(got 0.0)"),
    (["--personalise-own-lr", "inf"], "--personalise-own-lr", "(got inf)"),
    (["--gpus-per-client", "nan"], "--gpus-per-client", "(got nan)"),
    (["--virtual-sites", "3", "--partitioner", "dirichlet", "--alpha", "-1"], "--alpha", "(got -1.0)"),
    (["--virtual-sites", "100000"], "--virtual-sites", "only"),
])
def test_fl_sim_run_refuses_bad_numbers_before_any_work(tmp_path, capsys, monkeypatch, args, option, text):
    code, out = _fl_sim(_run(tmp_path, *args), capsys, monkeypatch)
    assert code == 2, out
    assert option in out and text in out, out
    assert "not shown" not in out and "Traceback" not in out
    assert not (tmp_path / "out").exists()  # nothing created


def test_fl_sim_run_out_is_a_file(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, out = _fl_sim(["run", "-d", "health", "-r", "1", "--engine", "inprocess", "-o", afile], capsys, monkeypatch)
    assert code == 2 and "--out" in out and "is a file" in out, out
    code, out = _fl_sim(["run", "-d", "all", "-r", "1", "--engine", "inprocess", "-o", afile / "sub"], capsys, monkeypatch)
    assert code == 2 and "--out" in out and "which is a file" in out, out
    assert afile.read_text() == "x"


def test_fl_sim_run_resume_without_checkpoint(tmp_path, capsys, monkeypatch):
    (tmp_path / "out").mkdir()
    code, out = _fl_sim(_run(tmp_path, "--resume"), capsys, monkeypatch)
    assert code == 2 and "--resume" in out and "has no checkpoint.safetensors" in out and "drop --resume" in out, out
    assert str(tmp_path / "out") in out
    assert list((tmp_path / "out").iterdir()) == []
    code, out = _fl_sim(["run", "-d", "health", "-o", tmp_path / "never", "--resume"], capsys, monkeypatch)
    assert code == 2 and "no checkpoint" in out and not (tmp_path / "never").exists()


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("make, text", [
    (lambda tmp: cli.Path(__file__).resolve().parents[1] / "examples" / "policies" / "traffic.toml",
     "is a policy for department 'traffic', and this run is for 'health'"),
    (lambda tmp: tmp / "nope.toml", "cannot read policy file"),
    (lambda tmp: tmp, "cannot read policy file"),  # a folder
    (lambda tmp: _write(tmp / "bad.toml", "department = \n"), "bad.toml"),  # a TOML syntax error
])
def test_fl_sim_run_policy_checked_up_front(tmp_path, capsys, monkeypatch, make, text):
    code, out = _fl_sim(_run(tmp_path, "--policy", make(tmp_path)), capsys, monkeypatch)
    assert code == 2 and "--policy" in out and text in out, out
    assert "not shown" not in out
    assert not (tmp_path / "out").exists()


def test_fl_sim_run_one_policy_for_all_departments(tmp_path, capsys, monkeypatch):
    pol = cli.Path(__file__).resolve().parents[1] / "examples" / "policies" / "health.toml"
    code, out = _fl_sim(["run", "-d", "all", "--engine", "inprocess", "-o", tmp_path / "out", "--policy", pol],
                        capsys, monkeypatch)
    assert code == 2 and "--policy" in out and "one department" in out, out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, option, text", [
    (["-e", "20"], "--epsilon", "above the lifetime max_epsilon 8"),
    (["--no-dp"], "--no-dp", "dp is off but policy require_dp = true"),
    (["--noise-multiplier", "0.5"], "--noise-multiplier", "noise_multiplier 0.5 < policy min_noise_multiplier 0.8"),
    (["--clip", "2"], "--clip", "clipping_norm 2 > policy max_clipping_norm 1"),
])
def test_fl_sim_run_settings_every_node_would_refuse(tmp_path, capsys, monkeypatch, args, option, text):
    code, out = _fl_sim(_run(tmp_path, *args), capsys, monkeypatch)
    assert code == 2 and option in out and text in out and "every node would refuse" in out, out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, args, option, text", [
    ("require_secure_aggregation = true\n", [], "--secagg", "require_secure_aggregation = true"),
    ("min_secagg_threshold = 3\n", ["--secagg", "--secagg-threshold", "2"], "--secagg-threshold",
     "secagg-threshold 2 < policy min_secagg_threshold 3"),
    ("min_secagg_num_shares = 5\n", ["--secagg"], "--secagg-num-shares",
     "secagg-num-shares 3 < policy min_secagg_num_shares 5"),
])
def test_fl_sim_run_secure_aggregation_every_node_would_refuse(tmp_path, capsys, monkeypatch, extra, args, option, text):
    example = cli.Path(__file__).resolve().parents[1] / "examples" / "policies" / "health.toml"
    pol = _write(tmp_path / "policy.toml", example.read_text().replace("[releases]", extra + "[releases]", 1))
    code, out = _fl_sim(_run(tmp_path, "--policy", pol, *args), capsys, monkeypatch)
    assert code == 2 and option in out and text in out and "every node would refuse" in out, out
    assert not (tmp_path / "out").exists()


def test_untrained_run_is_reported(capsys, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 400)
    refused = {"rounds": [{"round": 1, "train": {"accepted": 0}}],
               "refused": [{"round": 1, "node": 1, "reason": "health/Cleveland: refused: projected epsilon 9 > policy max_epsilon 8"}],
               "excluded": [], "config": {"run-dir": "runs/x"}}
    assert cli._untrained("health", refused)
    out = " ".join(capsys.readouterr().err.split())  # errors go to standard error
    assert "no node's update was accepted in any of the 1 round(s)" in out and "projected epsilon 9" in out
    assert "runs/x/results.json" in out
    assert not cli._untrained("health", {"rounds": [{"round": 1, "train": {"accepted": 0}},
                                                    {"round": 2, "train": {"accepted": 3}}]})


def test_cli_bounds_match_the_run_config():
    assert (cli._MAX_ROUNDS, cli._MAX_EPOCHS, cli._MAX_NODES, cli._MAX_BATCH, cli._MAX_SEED) == (
        server_app.MAX_ROUNDS, server_app.MAX_EPOCHS, server_app.MAX_NODES, server_app.MAX_BATCH, server_app.MAX_SEED)


# -- fl-sim compare / baselines: checked before the first training -----------------------------------

@pytest.mark.parametrize("argv, option, text", [
    (["compare", "-d", "health", "--epsilon", "-1"], "--epsilon", "must be a finite number > 0"),
    (["compare", "-d", "health", "--epsilon", "inf"], "--epsilon", "(got inf)"),
    (["compare", "-d", "health", "--rounds", "0"], "--rounds", "0 is not in the range"),
    (["compare", "-d", "health", "--personalise-lr", "0"], "--personalise-lr", "(got 0.0)"),
    (["compare", "-d", "health", "--seed", "-1"], "--seed", "not in the range"),
    (["compare", "-d", "health", "--strategy", "fedsgd"], "run config 'strategy'", "fedsgd"),
    (["compare", "-d", "health", "--model", "gru"], "run config 'model'", "not a health model"),
    (["compare", "-d", "health", "--engine", "rey"], "--engine", "choose ray or inprocess"),
    (["baselines", "-d", "health", "--epsilon", "0"], "--epsilon", "must be a finite number > 0"),
    (["baselines", "-d", "health", "--epsilon", "nan"], "--epsilon", "(got nan)"),
    (["baselines", "-d", "health", "--max-grad-norm", "-1"], "--max-grad-norm", "(got -1.0)"),
    (["baselines", "-d", "health", "--seed", "-1"], "--seed", "not in the range"),
])
def test_compare_and_baselines_check_before_training(tmp_path, capsys, monkeypatch, argv, option, text):
    import simulations.baselines as baselines
    import simulations.compare as compare

    def never(*a, **k):
        raise AssertionError("trained before the options were checked")

    monkeypatch.setattr(compare, "run_compare", never)
    monkeypatch.setattr(baselines, "run_baselines", never)
    code, out = _fl_sim([*argv, "-o", tmp_path / "out"], capsys, monkeypatch)
    assert code == 2 and option in out and text in out, out
    assert not (tmp_path / "out").exists()


def test_compare_out_is_a_file(tmp_path, capsys, monkeypatch):
    afile = _write(tmp_path / "afile", "x")
    for cmd in ("compare", "baselines"):
        code, out = _fl_sim([cmd, "-d", "health", "-o", afile], capsys, monkeypatch)
        assert code == 2 and "--out" in out and "is a file" in out, out


# -- a real (1-round, in-process) run: every node refused every round -> exit 1 ------------------------

def test_fl_sim_run_all_refused_exits_1(tmp_path, capsys, monkeypatch):
    src = (cli.Path(__file__).resolve().parents[1] / "examples" / "policies" / "health.toml").read_text()
    pol = _write(tmp_path / "tiny.toml", src.replace("max_epsilon = 8.0", "max_epsilon = 0.01"))
    # a fixed noise multiplier the policy allows, whose first round already spends more than 0.01
    code, out = _fl_sim(_run(tmp_path, "--policy", pol, "--noise-multiplier", "0.8", "-e", "0.01"), capsys, monkeypatch)
    assert code == 1, out
    assert "no node's update was accepted in any of the 1 round(s)" in out and "max_epsilon 0.01" in out, out
    res = json.loads((tmp_path / "out" / "results.json").read_text())  # kept for the diagnosis
    assert res["rounds"][0]["train"]["accepted"] == 0 and res["refused"]
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in res["config"].values())


def test_fl_sim_run_resume_of_a_legacy_checkpoint(tmp_path, capsys, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoint.pkl").write_bytes(b"not unpickled")
    code, out = _fl_sim(_run(tmp_path, "--resume"), capsys, monkeypatch)
    assert code == 2 and "--resume" in out and "checkpoint.pkl" in out, out


def test_fl_sim_run_resume_all_departments(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, text = _fl_sim(["run", "-d", "all", "--engine", "inprocess", "-o", out, "--resume"], capsys, monkeypatch)
    assert code == 2 and "none of" in text and "has a checkpoint.safetensors" in text and "has no" not in text, text
    # a -d all run interrupted in traffic: health and traffic have checkpoints, utility had not started
    ran = []
    monkeypatch.setattr(cli, "_run_one", lambda d, cfg, dout, *a: ran.append(d) or {"rounds": [{"train": {"accepted": 1}}]})
    from server.artefacts import CHECKPOINT, write_checkpoint

    for d in ("health", "traffic"):  # checkpoints of round 2 of the default rounds
        (out / d).mkdir(parents=True)
        write_checkpoint(out / d / CHECKPOINT, {"run_id": "sim", "round": 2, "arrays": {}, "strategy_state": {},
                                                "history": {}})
    code, text = _fl_sim(["run", "-d", "all", "--engine", "inprocess", "-o", out, "--resume"], capsys, monkeypatch)
    assert code == 0 and ran == ["health", "traffic", "utility"], text
    assert "utility starts at round 1" in text


def test_run_config_error_names_the_refused_keys():
    from server.app import RunConfigError, settings

    with pytest.raises(RunConfigError) as exc:
        settings({"department": "health", "lr": 0.0, "batch-size": 0})
    assert set(exc.value.keys) == {"lr", "batch-size"}
    with pytest.raises(RunConfigError) as exc:
        settings({"department": "health", "model": "gru"})
    assert exc.value.keys == ("model",)
    with pytest.raises(RunConfigError) as exc:  # two keys that do not go together: no one key to blame
        settings({"department": "health", "secagg": True, "strategy": "krum"})
    assert exc.value.keys == ()


def test_a_full_disk_is_named_with_the_file_not_hidden():
    """An OSError from the operating system (an errno and its text) carries no record value: fl-sim
    ended a run on a full disk with "its message is not shown", hiding "No space left on device" and
    the file (independent reliability review, 2026-12-07)."""
    import errno

    text = describe(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/h3/results.json"))
    assert "No space left on device" in text and "/runs/h3/results.json" in text and "ENOSPC" in text, text
    hidden = describe(OSError("could not parse chol=412"))  # a library's own message: still not shown
    assert "412" not in hidden and "not shown" in hidden
    hidden = describe(FileNotFoundError(errno.ENOENT, "value 412 not found"))  # strerror that is not the OS's
    assert "412" not in hidden
