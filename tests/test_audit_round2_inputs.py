"""``fl-sim audit`` inputs found in the second bad-input round: repeated --epsilon/--site values, fixed output
files that are folders, and CITYFED_AUDIT_THREADS. Each is refused (exit 2, naming the option or variable, the
value and a fix) before any model is trained or any ledger written."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import simulations.mia as mia  # noqa: E402
from sim_helpers import fl_sim as _fl_sim  # noqa: E402

TINY = ["audit", "-d", "health", "--no-control", "--shadows", "2", "--targets", "1", "--canaries", "0"]


@pytest.fixture()
def never_train(monkeypatch):
    """The audit's training fails the test: every refusal here comes first."""

    def never(*a, **k):
        raise AssertionError("trained before the input was checked")

    monkeypatch.setattr(mia, "run_audit", never)


def _refused(code, out, err, *words):
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert err.startswith("error:") and "fix:" in err, err
    for w in words:
        assert w in err, (w, err)


# -- D2: repeated values of a repeatable option ---------------------------------------------------------------

@pytest.mark.parametrize("values", [("3", "3"), ("3", "3.0000001"), ("1", "8", "8.0")])
def test_repeated_epsilon_is_refused_before_training(tmp_path, capsys, monkeypatch, never_train, values):
    """Epsilons that name the same ledger (audit-eps{eps:g}.sqlite) would be composed into one: refused."""
    out_dir = tmp_path / "a"
    argv = [*TINY, "-o", out_dir]
    for v in values:
        argv += ["-e", v]
    code, out, err = _fl_sim(argv, capsys, monkeypatch)
    _refused(code, out, err, "--epsilon", repr(float(values[-2])), repr(float(values[-1])), "once")
    assert not out_dir.exists()


def test_repeated_site_is_refused_before_training(tmp_path, capsys, monkeypatch, never_train):
    """A site given twice would put each of its records in the pool twice (the audit's independence breaks)."""
    out_dir = tmp_path / "a"
    code, out, err = _fl_sim([*TINY, "-e", "3", "-s", "Cleveland", "-s", "Hungary", "-s", "Cleveland", "-o", out_dir],
                             capsys, monkeypatch)
    _refused(code, out, err, "--site", "'Cleveland'", "once")
    assert not out_dir.exists()


def test_run_audit_refuses_epsilons_that_share_a_ledger(tmp_path):
    """The library call too (before the data is loaded or anything written)."""
    s = mia.AuditSettings(department="health", epsilons=(3.0, 3.0000001), shadows=2, targets=1, canaries=0)
    with pytest.raises(ValueError, match="audit-eps3.sqlite"):
        mia.run_audit(s, tmp_path / "a")
    s = mia.AuditSettings(department="health", epsilons=(3.0,), shadows=2, targets=1, canaries=0,
                          sites=("Cleveland", "Cleveland"))
    with pytest.raises(ValueError, match="Cleveland"):
        mia.run_audit(s, tmp_path / "a")
    assert not (tmp_path / "a").exists()


# -- D3: a fixed output file that is a folder -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["audit.json", "audit.json.tmp", "report.html", "report.html.tmp", "ledgers"])
def test_output_file_that_is_a_folder_is_refused_before_training(tmp_path, capsys, monkeypatch, never_train, name):
    out_dir = tmp_path / "a"
    if name == "ledgers":  # the ledgers' folder is a file
        out_dir.mkdir()
        (out_dir / name).write_text("keep me")
    else:
        (out_dir / name).mkdir(parents=True)
        (out_dir / name / "keep.txt").write_text("keep me")
    code, out, err = _fl_sim([*TINY, "-e", "3", "-o", out_dir], capsys, monkeypatch)
    _refused(code, out, err, "--out", str(out_dir / name))
    assert sorted(p.name for p in out_dir.iterdir()) == [name]  # nothing added, nothing removed
    assert "keep me" in ((out_dir / name).read_text() if name == "ledgers" else (out_dir / name / "keep.txt").read_text())


def test_ledger_path_that_is_a_folder_is_refused_with_overwrite(tmp_path, capsys, monkeypatch, never_train):
    """--overwrite removes earlier ledgers; a folder under an audit ledger's name is not one: refused, kept."""
    (tmp_path / "a" / "ledgers" / "audit-eps3.sqlite").mkdir(parents=True)
    code, out, err = _fl_sim([*TINY, "-e", "3", "--overwrite", "-o", tmp_path / "a"], capsys, monkeypatch)
    _refused(code, out, err, "--out", str(tmp_path / "a" / "ledgers" / "audit-eps3.sqlite"))
    assert (tmp_path / "a" / "ledgers" / "audit-eps3.sqlite").is_dir()


def test_run_audit_refuses_an_audit_json_folder_before_training(tmp_path, monkeypatch):
    (tmp_path / "audit.json").mkdir()

    def never(*a, **k):
        raise AssertionError("loaded the data before the output was checked")

    import citydata

    monkeypatch.setattr(citydata, "load_department", never)
    s = mia.AuditSettings(department="health", epsilons=(3.0,), shadows=2, targets=1, canaries=0)
    with pytest.raises(IsADirectoryError, match="audit.json"):
        mia.run_audit(s, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.json"]


def test_failed_final_write_leaves_no_partial_file_and_no_ledger(tmp_path, capsys, monkeypatch):
    """The disk fills up at the last step: exit 1 naming audit.json, no audit.json.tmp, no ledger blocking a rerun."""
    import errno
    import pathlib

    real = pathlib.Path.replace

    def full_disk(self, target):
        if self.name == "audit.json.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, target)

    monkeypatch.setattr(pathlib.Path, "replace", full_disk)
    monkeypatch.setenv("CITYFED_AUDIT_THREADS", "1")
    out_dir = tmp_path / "a"
    code, out, err = _fl_sim([*TINY, "-e", "8", "-s", "Cleveland", "-o", out_dir], capsys, monkeypatch)
    assert code == 1, (code, out, err)
    assert str(out_dir / "audit.json") in err and "No space left on device" in err and "fix:" in err, err
    assert "Traceback" not in out + err
    assert not (out_dir / "audit.json.tmp").exists() and not (out_dir / "audit.json").exists()
    assert list((out_dir / "ledgers").glob("audit-*")) == [] if (out_dir / "ledgers").exists() else True


# -- D5: CITYFED_AUDIT_THREADS ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value,what", [
    ("abc", "not a whole number"),
    ("2.5", "not a whole number"),
    ("0", "out of range"),
    ("-3", "out of range"),
    ("100000", "out of range"),
])
def test_bad_audit_threads_is_refused_before_training(tmp_path, capsys, monkeypatch, never_train, value, what):
    monkeypatch.setenv("CITYFED_AUDIT_THREADS", value)
    out_dir = tmp_path / "a"
    code, out, err = _fl_sim([*TINY, "-e", "3", "-o", out_dir], capsys, monkeypatch)
    _refused(code, out, err, f"CITYFED_AUDIT_THREADS={value!r}", what, f"1 to {os.cpu_count()}", "unset")
    assert not out_dir.exists()


@pytest.mark.parametrize("value,threads", [("", 1), (" 1 ", 1), (str(os.cpu_count()), os.cpu_count())])
def test_good_audit_threads_is_used(tmp_path, capsys, monkeypatch, value, threads):
    import torch

    seen = {}

    def record(settings, out, on_model=None):
        seen["threads"] = torch.get_num_threads()
        raise SystemExit(0)

    monkeypatch.setattr(mia, "run_audit", record)
    before = torch.get_num_threads()
    monkeypatch.setenv("CITYFED_AUDIT_THREADS", value)
    try:
        code, out, err = _fl_sim([*TINY, "-e", "3", "-o", tmp_path / "a"], capsys, monkeypatch)
    finally:
        threads_seen = seen.get("threads")
        torch.set_num_threads(before)
    assert code == 0 and threads_seen == threads, (code, out, err, threads_seen)


@pytest.mark.parametrize("value", ["bogus", "cuda:x"])
def test_bad_device_is_refused_before_training(tmp_path, capsys, monkeypatch, never_train, value):
    """A bad CITYFED_DEVICE was found only once the audit trained its first model (exit 2 after spending time)."""
    monkeypatch.setenv("CITYFED_DEVICE", value)
    out_dir = tmp_path / "a"
    code, out, err = _fl_sim([*TINY, "-e", "3", "-o", out_dir], capsys, monkeypatch)
    _refused(code, out, err, "CITYFED_DEVICE")
    assert not out_dir.exists()
