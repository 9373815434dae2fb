"""fl-sim run refuses, before anything is created or trained, an --epsilon whose calibrated noise
every simulated node's policy refuses (below its min_noise_multiplier): the run would train nothing.

The check runs the nodes' own code (clients.node.plan_train) on temporary copies of the run's
ledgers: the real ledgers stay as they were.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import simulations.cli as cli
from sim_helpers import assert_input_error, fl_sim

ROOT = Path(__file__).resolve().parents[1]
HEALTH = ROOT / "examples" / "policies" / "health.toml"
RUN = ["run", "-d", "health", "-r", "1", "--engine", "inprocess"]


@pytest.fixture()
def never_train(monkeypatch):
    """fl-sim run's training fails the test: the refusal must come first."""

    def never(*a, **k):
        raise AssertionError("trained before the calibrated noise was checked")

    monkeypatch.setattr(cli, "_run_one", never)


@pytest.fixture()
def fake_train(monkeypatch):
    """fl-sim run's training replaced by a run that trained (the check passed): the calls are recorded."""
    calls = []

    def fake(department, cfg, out, engine, ray_options=None):
        calls.append(department)
        return {"status": "completed", "rounds": [{"train": {"accepted": 1}}], "config": dict(cfg)}

    monkeypatch.setattr(cli, "_run_one", fake)
    return calls


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _ledgers(out: Path) -> Path:
    """OUT/ledgers with a ledger of an earlier run (a count release of run 'sim' at one site)."""
    from privacy.ledger import PrivacyLedger, Release

    folder = out / "ledgers"
    folder.mkdir(parents=True)
    ledger = PrivacyLedger(folder / "health-cleveland.sqlite")
    rid = ledger.begin(Release(noise_multiplier=10.0, sample_rate=1.0, steps=1, delta=1e-4, run_id="sim", round=1,
                               site="cleveland", department="health", mechanism="gaussian-count"))
    ledger.commit(rid)
    del ledger
    return folder


def test_epsilon_8_refused_before_training(tmp_path, capsys, monkeypatch, never_train):
    out = tmp_path / "x"
    code, so, err = fl_sim([*RUN, "-e", "8", "-o", out], capsys, monkeypatch)
    assert_input_error(code, so, err)
    assert "error: --epsilon: 8" in err, err
    assert "min_noise_multiplier 0.8" in err and str(HEALTH) in err, err
    assert "noise multiplier" in err and "calibrates" in err, err
    assert "fix: --epsilon" in err and "--policy" in err, err
    assert not out.exists()


def test_epsilon_8_refusal_names_the_largest_epsilon_that_passes(tmp_path, capsys, monkeypatch, fake_train):
    code, so, err = fl_sim([*RUN, "-e", "8", "-o", tmp_path / "x"], capsys, monkeypatch)
    assert code == 2, err
    fix = err.split("fix: --epsilon ", 1)[1].split()[0]
    largest = float(fix.rstrip(",;"))
    assert 3 <= largest < 8, err
    code, so, err = fl_sim([*RUN, "-e", f"{largest:g}", "-o", tmp_path / "y"], capsys, monkeypatch)
    assert code == 0, err
    assert fake_train == ["health"]


def test_epsilon_3_passes(tmp_path, capsys, monkeypatch, fake_train):
    code, so, err = fl_sim([*RUN, "-e", "3", "-o", tmp_path / "x"], capsys, monkeypatch)
    assert code == 0, err
    assert fake_train == ["health"]


def test_lower_min_noise_policy_makes_epsilon_8_pass(tmp_path, capsys, monkeypatch, fake_train):
    policy = tmp_path / "health-low-noise.toml"
    text = HEALTH.read_text()
    assert "min_noise_multiplier = 0.8" in text
    policy.write_text(text.replace("min_noise_multiplier = 0.8", "min_noise_multiplier = 0.5"))
    code, so, err = fl_sim([*RUN, "-e", "8", "--policy", policy, "-o", tmp_path / "x"], capsys, monkeypatch)
    assert code == 0, err
    assert fake_train == ["health"]


def test_real_ledgers_untouched(tmp_path, capsys, monkeypatch, never_train):
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the check's copies go here, and must go
    out = tmp_path / "x"
    folder = _ledgers(out)
    before = _snapshot(folder)
    code, so, err = fl_sim([*RUN, "-e", "8", "-o", out], capsys, monkeypatch)
    assert code == 2, err
    assert _snapshot(folder) == before
    assert sorted(p.name for p in out.iterdir()) == ["ledgers"]
    assert list(scratch.iterdir()) == []


def test_real_ledgers_untouched_when_the_check_passes(tmp_path, capsys, monkeypatch, fake_train):
    out = tmp_path / "x"
    folder = _ledgers(out)
    before = _snapshot(folder)
    code, so, err = fl_sim([*RUN, "-e", "3", "-o", out], capsys, monkeypatch)
    assert code == 0, err
    assert _snapshot(folder) == before
