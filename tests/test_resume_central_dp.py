"""A run resumed with central DP must have had it from round 1: otherwise no central epsilon covers its model.

Found by a review (2026-12-07, s18 finding 1, HIGH): `fl-sim run -r 1`, then `--resume -r 2
--central-dp` only logged a warning; results.json, report.html and the exported model card then
claimed a central epsilon (4.73) for a model whose round-1 aggregate had been published without
noise (its real central epsilon is infinite).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim_helpers import copy_run, fl_sim, ledger_bytes

CENTRAL = ["--central-dp", "--central-noise", "1.0", "--central-clip", "0.1"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """One finished round of a health run without central DP (its checkpoint holds no central accountant)."""
    from simulations.run import simulate

    run_dir = tmp_path_factory.mktemp("plain") / "run"
    simulate({"department": "health", "num-rounds": 1, "local-epochs": 1, "target-epsilon": 3.0, "min-nodes": 1,
              "run-dir": str(run_dir), "run-id": "plain"}, engine="inprocess")
    return run_dir


def test_fl_sim_refuses_to_resume_a_run_without_central_dp_under_central_dp(plain_run, tmp_path, capsys, monkeypatch):
    run_dir = copy_run(plain_run, tmp_path / "run")
    ckpt, ledgers = (run_dir / "checkpoint.safetensors").read_bytes(), ledger_bytes(run_dir)
    results = (run_dir / "results.json").read_bytes()
    code, out, err = fl_sim(["run", "-d", "health", "-r", "2", "--local-epochs", "1", "--engine", "inprocess",
                             "-o", run_dir, "--resume", *CENTRAL], capsys, monkeypatch)
    text = " ".join(err.split())
    assert code == 2, (out, err)
    assert "--central-dp" in text and "without central DP" in text and "fix:" in text, text
    # refused before anything ran: no round trained, no release, nothing rewritten
    assert (run_dir / "checkpoint.safetensors").read_bytes() == ckpt
    assert ledger_bytes(run_dir) == ledgers and (run_dir / "results.json").read_bytes() == results


def test_the_server_app_refuses_it_too(plain_run, tmp_path):
    """The ServerApp's own check (flwr run, fl-server): a run-config error naming central-dp, before any message."""
    from unittest import mock

    from server.app import RunConfigError, run_federation

    run_dir = copy_run(plain_run, tmp_path / "run")
    ckpt = (run_dir / "checkpoint.safetensors").read_bytes()
    grid = mock.MagicMock(name="grid")
    cfg = {"department": "health", "num-rounds": 2, "local-epochs": 1, "run-dir": str(run_dir), "resume": True,
           "central-dp": True, "central-noise-multiplier": 1.0, "central-clipping-norm": 0.1}
    with pytest.raises(RunConfigError) as err:
        run_federation(grid, cfg, run_id="7")
    assert err.value.keys == ("central-dp",) and "without central DP" in str(err.value) and "fix:" in str(err.value)
    assert grid.mock_calls == []  # no node was sent anything
    assert (run_dir / "checkpoint.safetensors").read_bytes() == ckpt


def test_a_central_dp_run_still_resumes_and_one_resumed_without_it_claims_nothing(tmp_path, capsys, monkeypatch):
    """The allowed ways: central DP from round 1 resumes (its accountant continues); dropping it on resume
    publishes no central epsilon (results.json has none), with the warning the log already gave."""
    run_dir = tmp_path / "run"
    base = ["run", "-d", "health", "--local-epochs", "1", "--engine", "inprocess", "-o", run_dir]
    code, out, err = fl_sim([*base, "-r", "1", *CENTRAL], capsys, monkeypatch)
    assert code == 0, (out, err)
    code, out, err = fl_sim([*base, "-r", "2", "--resume", *CENTRAL], capsys, monkeypatch)
    assert code == 0, (out, err)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["central-dp"]["rounds"] == 2
    code, out, err = fl_sim([*base, "-r", "3", "--resume"], capsys, monkeypatch)
    assert code == 0, (out, err)
    assert "central-dp" not in json.loads((run_dir / "results.json").read_text())
    # and from there on the run never had central DP in every round: refused again
    code, out, err = fl_sim([*base, "-r", "4", "--resume", *CENTRAL], capsys, monkeypatch)
    assert code == 2 and "without central DP" in " ".join(err.split()), (out, err)


# -- what counts as a round published without central DP (review of the change, s18) -----------------------------
def _round(rnd: int, **train) -> dict:
    return {"round": rnd, "train": train}


def test_a_rejected_or_stopped_round_published_nothing():
    """A SecAgg+ aggregate the coordinator rejected (global model unchanged) or a round that stopped published no
    aggregate: it needs no central noise, and does not bar a resume with central DP (it did: the accountant's round
    count was compared with the checkpoint's, and a rejected round advances the checkpoint)."""
    from server.central_dp import unnoised_rounds

    noised = {"central-dp": {"epsilon": 1.0}, "aggregate": {}, "published": True}
    history = {"rounds": [_round(1, **noised), _round(2, aggregate={"aggregate-update-norm": 9.0}, rejected="norm"),
                          _round(3, stopped="too few"), _round(4, **noised)]}
    assert unnoised_rounds(history) == []
    history["rounds"].append(_round(5, aggregate={}, published=True))  # a launch without central DP published round 5
    assert unnoised_rounds(history) == [5]
    # a checkpoint written before rounds carried `published`: an aggregate neither rejected nor stopped was published
    legacy = {"rounds": [_round(1, aggregate={}, **{"central-dp": {}}), _round(2, aggregate={}),
                         _round(3, aggregate={}, rejected="norm")]}
    assert unnoised_rounds(legacy) == [2]


def test_a_launch_without_central_dp_that_published_nothing_keeps_the_accountant(tmp_path):
    """A resumed launch without central DP whose round stopped (too few updates) published nothing: the checkpoint
    keeps the central accountant (it was dropped), and a later resume with central DP continues it from round 1's."""
    from server.central_dp import CentralAccountant
    from server.strategy import load_checkpoint
    from simulations.run import simulate

    cfg = {"department": "health", "local-epochs": 1, "target-epsilon": 3.0, "min-nodes": 1, "run-id": "c",
           "run-dir": str(tmp_path / "run"), "central-noise-multiplier": 1.0, "central-clipping-norm": 0.1,
           "central-delta": 1e-5}
    simulate({**cfg, "num-rounds": 1, "central-dp": True}, engine="inprocess")
    res = simulate({**cfg, "num-rounds": 2, "resume": True, "min-accepted": 5, "round-timeout": 2},  # 4 hospitals
                   engine="inprocess")
    assert str(res["status"]).startswith("stopped")
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert ck["strategy_state"]["central_dp"]["history"] == [[1.0, 1.0, 1]]
    res = simulate({**cfg, "num-rounds": 2, "resume": True, "central-dp": True}, engine="inprocess")
    assert res["central-dp"]["rounds"] == 2
    assert res["central-dp"]["epsilon"] == pytest.approx(CentralAccountant(1e-5, history=[(1.0, 1.0, 2)]).epsilon())
