"""fl-sim and the ClientApp: defects found by the second README check (docs round 2).

* Configuration errors (CITYFED_DEVICE, ``flwr run``'s node count, a missing example policy, the
  simulation's own arguments) are shown: their messages hold no record value, and the no-traceback
  handler hid them as if they might (``privacy.safe_cli.describe``). fl-sim refuses a bad
  ``CITYFED_DEVICE`` before training (exit 2, the variable, its value and the fix).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import simulations.cli as cli
from privacy.safe_cli import describe
from sim_helpers import assert_input_error, fl_sim


@pytest.fixture()
def never_train(monkeypatch):
    def never(*a, **k):
        raise AssertionError("trained before the input was checked")

    monkeypatch.setattr(cli, "_run_one", never)
    import simulations.baselines as baselines
    import simulations.compare as compare

    monkeypatch.setattr(baselines, "run_baselines", never)
    monkeypatch.setattr(compare, "run_compare", never)
    monkeypatch.setattr(cli, "_baselines", never)


def _raised(call) -> BaseException:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return exc
    raise AssertionError("nothing raised")


# -- 1. configuration errors are shown ------------------------------------------------------------

@pytest.mark.parametrize("value, text", [("cuda", "sees no CUDA device"), ("cuda:1", "sees no CUDA device"),
                                         ("bogus", "is not a device")])
@pytest.mark.parametrize("command", [["run", "-d", "health", "-r", "1", "--engine", "inprocess"],
                                     ["compare", "-d", "health", "-r", "1"],
                                     ["baselines", "-d", "health", "--epochs", "1"]])
def test_bad_cityfed_device_is_an_input_error_naming_it(tmp_path, capsys, monkeypatch, never_train, value, text,
                                                         command):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CITYFED_DEVICE", value)
    out = tmp_path / "o"
    code, stdout, err = fl_sim([*command, "-o", out], capsys, monkeypatch)
    assert_input_error(code, stdout, err)
    assert f"CITYFED_DEVICE={value!r}" in err and text in err and "auto" in err and "cpu" in err, err
    assert not out.exists()


def test_device_error_message_is_shown():
    from shared_models.device import choose_device

    exc = _raised(lambda: choose_device("cuda", cuda_available=False, gpu_granted=None))
    assert isinstance(exc, ValueError)
    shown = describe(exc)
    assert "CITYFED_DEVICE='cuda'" in shown and "not shown" not in shown, shown


def test_flwr_run_node_count_error_is_shown():
    from clients.app import flwr_run_node_defaults

    exc = _raised(lambda: flwr_run_node_defaults({"partition-id": 0, "num-partitions": 3},
                                                 {"department": "health", "run-dir": "/tmp/x"}))
    assert isinstance(exc, ValueError)
    shown = describe(exc)
    assert "num-supernodes=4" in shown and "not shown" not in shown, shown


def test_missing_example_policy_error_is_shown(monkeypatch):
    import importlib.util

    import clients.app as capp

    monkeypatch.setattr(capp, "__file__", "/nonexistent/cityfed/clients/app.py")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    exc = _raised(lambda: capp.example_policy("health"))
    assert isinstance(exc, FileNotFoundError)
    shown = describe(exc)
    assert "no example policy for department 'health'" in shown and "make install" in shown, shown


def test_simulate_argument_errors_are_shown(tmp_path):
    from simulations.run import simulate

    cfg = {"department": "health", "run-dir": str(tmp_path / "r"), "num-rounds": 1}
    exc = _raised(lambda: simulate(cfg, engine="inprocess", only_sites=["Nowhere"]))
    assert "unknown site(s) ['Nowhere']" in describe(exc), describe(exc)
    exc = _raised(lambda: simulate(cfg, engine="ray", only_sites=["Cleveland"]))
    assert "only_sites needs engine='inprocess'" in describe(exc), describe(exc)


def test_device_error_raised_inside_any_command_is_an_input_error(capsys, monkeypatch):
    """A command without its own pre-flight check (e.g. fl-sim audit) still answers a bad CITYFED_DEVICE with exit 2."""
    from shared_models.device import DeviceError

    def datasets(*a, **k):
        raise DeviceError("CITYFED_DEVICE='bogus' is not a device", "set CITYFED_DEVICE to auto")

    monkeypatch.setattr(cli, "_packages", datasets)
    code, out, err = fl_sim(["datasets", "health"], capsys, monkeypatch)
    assert_input_error(code, out, err)
    assert "CITYFED_DEVICE='bogus'" in err, err


# -- 4. too many virtual sites: a fix fl-sim run's user can apply ---------------------------------

def test_too_many_virtual_sites_names_a_fix_that_exists(tmp_path, capsys, monkeypatch, never_train):
    out = tmp_path / "vs"
    code, stdout, err = fl_sim(["run", "-d", "traffic", "--virtual-sites", "100000", "-o", out], capsys, monkeypatch)
    assert_input_error(code, stdout, err)
    assert "--virtual-sites" in err and "100000" in err and "training windows" in err, err
    assert "run config virtual-allow-empty" not in err, err  # a node key: fl-sim run cannot set it
    assert "benchmarks/sim_scale.py" in err and "--allow-empty" in err, err
    assert not out.exists()


# -- 5. -d all --resume without any checkpoint: no double negative --------------------------------

def test_resume_all_without_checkpoints_says_none_has_one(tmp_path, capsys, monkeypatch, never_train):
    code, stdout, err = fl_sim(["run", "-d", "all", "-o", tmp_path, "--resume", "--engine", "inprocess"], capsys,
                               monkeypatch)
    assert_input_error(code, stdout, err)
    assert "has no checkpoint" not in err, err
    assert f"none of {tmp_path / 'health'}" in err and "has a checkpoint.safetensors" in err, err


# -- 6. --resume of a run that finished all its rounds --------------------------------------------

def _finished(folder: Path, rounds: int) -> Path:
    from server.artefacts import CHECKPOINT, write_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    import numpy as np

    from server.artefacts import MODEL, save_model

    write_checkpoint(folder / CHECKPOINT, {"run_id": "sim", "round": rounds, "arrays": {}, "strategy_state": {},
                                           "history": {}})
    (folder / "results.json").write_text('{"status": "completed", "rounds": []}')
    save_model(folder / MODEL, {"w": np.zeros(2, dtype=np.float32)})  # every final file there: nothing to rewrite
    (folder / "report.html").write_text("<html></html>\n")
    return folder


def test_resume_of_a_finished_run_is_refused_and_rewrites_nothing(tmp_path, capsys, monkeypatch, never_train):
    run_dir = _finished(tmp_path / "h", 15)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    code, stdout, err = fl_sim(["run", "-d", "health", "-o", run_dir, "--resume", "--engine", "inprocess"], capsys,
                               monkeypatch)
    assert_input_error(code, stdout, err)
    assert "--resume" in err and str(run_dir) in err and "finished all 15" in err and "--rounds" in err, err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_resume_with_more_rounds_than_the_finished_run_still_runs(tmp_path, capsys, monkeypatch):
    run_dir = _finished(tmp_path / "h", 15)
    ran = []
    monkeypatch.setattr(cli, "_run_one", lambda d, cfg, *a, **k: ran.append((d, cfg["num-rounds"])) or
                        {"rounds": [{"round": 16, "train": {"accepted": 4}}], "status": "completed"})
    code, stdout, err = fl_sim(["run", "-d", "health", "-o", run_dir, "--resume", "-r", "16", "--engine", "inprocess"],
                               capsys, monkeypatch)
    assert code == 0, (stdout, err)
    assert ran == [("health", 16)]


def test_resume_all_skips_the_departments_that_finished(tmp_path, capsys, monkeypatch):
    _finished(tmp_path / "health", 15)
    ran = []
    monkeypatch.setattr(cli, "_run_one", lambda d, cfg, *a, **k: ran.append(d) or
                        {"rounds": [{"round": 1, "train": {"accepted": 1}}], "status": "completed"})
    code, stdout, err = fl_sim(["run", "-d", "all", "-o", tmp_path, "--resume", "--engine", "inprocess"], capsys,
                               monkeypatch)
    assert code == 0, (stdout, err)
    assert ran == ["traffic", "utility"]
    assert "health" in stdout and "finished all 15" in stdout, stdout


# -- 7. an --out that cannot be created, whatever the reason (root: os.access says yes) -----------

@pytest.mark.parametrize("out", ["/sys/cityfed-h5-test/x", "/proc/cityfed-h5-test", "/sys/cityfed-h5-test"])
@pytest.mark.parametrize("command", [["run", "-d", "health", "-r", "1", "--engine", "inprocess"],
                                     ["compare", "-d", "health", "-r", "1"],
                                     ["baselines", "-d", "health", "--epochs", "1"],
                                     ["export-model", "RUN"], ["audit", "-d", "health"]])
def test_out_that_cannot_be_created_is_an_input_error(tmp_path, capsys, monkeypatch, never_train, out, command):
    command = [str(tmp_path) if a == "RUN" else a for a in command]
    code, stdout, err = fl_sim([*command, "-o", out], capsys, monkeypatch)
    assert_input_error(code, stdout, err)
    assert "--out" in err and out.split("/")[1] in err, err
    assert not Path(out).exists()


@pytest.mark.parametrize("out", ["/sys/cityfed-h5-test/x.csv", "/proc/cityfed-h5.csv"])
def test_export_to_a_file_that_cannot_be_created_is_an_input_error(capsys, monkeypatch, out):
    code, stdout, err = fl_sim(["export", "-d", "health", "--site", "Cleveland", "-o", out], capsys, monkeypatch)
    assert_input_error(code, stdout, err)
    assert "--out" in err, err


# -- 8. fl-sim datasets lists the site names that --site takes ------------------------------------

@pytest.mark.parametrize("department, names", [
    ("traffic", ["detector-1", "detector-13", "detector-28"]),
    ("health", ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]),
    ("utility", ["england-wales-2000", "portugal-2012", "victoria-2014"]),
])
def test_datasets_lists_the_site_names_export_takes(capsys, monkeypatch, department, names):
    from citydata import load_department

    assert set(names) <= set(load_department(department).sites)
    code, stdout, err = fl_sim(["datasets", department], capsys, monkeypatch)
    assert code == 0, err
    line = next((part for part in stdout.split("site names: ")[1:]), "")
    assert all(n in line for n in names), stdout
