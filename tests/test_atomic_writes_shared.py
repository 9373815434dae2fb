"""Every atomic write goes through contract.files.write_atomic (review s19, finding 11).

Before: the node's pinning records, its key-ledger binding, its personalised model and the supervisor's
``serverapps.json`` each had their own temporary-file-and-rename code. A failed write left its temporary file behind
(pinning, key binding), and the personalised model and ``serverapps.json`` were renamed into place without an fsync
(a power loss could leave an empty file under the final name).
"""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The paths os.fsync was called on (files and folders), in order."""
    real, seen = os.fsync, []

    def record(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


def _full(*_a, **_k):
    raise OSError(28, "No space left on device")


def test_write_atomic_can_make_the_file_private_and_the_rename_durable(tmp_path, fsynced):
    from contract.files import write_atomic

    target = tmp_path / "record.json"
    target.write_text("earlier")
    target.chmod(0o644)
    old = os.umask(0o022)
    try:
        write_atomic(target, b"new", mode=0o600, durable_dir=True)
    finally:
        os.umask(old)
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert fsynced == [str(tmp_path / "record.json.tmp"), str(tmp_path)], fsynced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_fsync_dir_is_one_function_for_contract_and_privacy():
    from contract.files import fsync_dir
    from privacy import audit

    assert audit.fsync_dir is fsync_dir
    fsync_dir(Path("/nonexistent/folder"))  # best effort: a folder that cannot be opened is no error


def test_pinning_write_json_that_fails_keeps_the_earlier_file_and_no_temp(tmp_path, fsynced):
    from clients.pinning import write_json

    path = tmp_path / "apps" / "approved.json"
    write_json(path, {"a": 1})
    assert fsynced[-1] == str(path.parent) and stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # kept durable
    with pytest.raises(TypeError):
        write_json(path, {"b": object()})  # not JSON: fails half-way through the dump
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["approved.json"]


def test_key_ledger_binding_that_cannot_be_written_leaves_no_temp(tmp_path, monkeypatch):
    from clients.cli import KEY_LEDGER_SUFFIX, check_key_ledger_binding
    from privacy.ledger import PrivacyLedger

    key, ledger = tmp_path / "keys" / "node.key", tmp_path / "ledger.sqlite"
    key.parent.mkdir()
    key.write_text("k")
    PrivacyLedger(ledger).ledger_id()
    old = os.umask(0o022)
    try:
        assert check_key_ledger_binding(key, ledger, "health", "Cleveland") is None
    finally:
        os.umask(old)
    record = key.with_name(key.name + KEY_LEDGER_SUFFIX)
    assert stat.S_IMODE(record.stat().st_mode) == 0o600 and json.loads(record.read_text())["ledger"] == str(ledger)
    record.unlink()
    monkeypatch.setattr(os, "fsync", _full)
    warning = check_key_ledger_binding(key, ledger, "health", "Cleveland")
    assert "No space left" in warning and "fix:" in warning, warning
    assert sorted(p.name for p in key.parent.iterdir()) == ["node.key"]


def test_supervisor_publishes_serverapps_json_fsynced(tmp_path, fsynced):
    from server.supervisor import SERVERAPPS_FILE, CoordinatorSupervisor

    sup = SimpleNamespace(state_dir=tmp_path, apps={1: SimpleNamespace(run_id=7, pid=1, start=2.0)})
    CoordinatorSupervisor._publish(sup)
    path = tmp_path / SERVERAPPS_FILE
    assert json.loads(path.read_text()) == {"7": {"pid": 1, "start": 2.0}}
    assert fsynced == [str(tmp_path / (SERVERAPPS_FILE + ".tmp"))], fsynced
    assert sorted(p.name for p in tmp_path.iterdir()) == [SERVERAPPS_FILE]


def test_personalised_model_is_fsynced_before_it_is_renamed_into_place(tmp_path, fsynced):
    from test_personalise import _cfg, _global_state, _identity, _spec  # noqa: F401 (autouse fixture)

    from clients.personalise import handle_personalise, load_personalised, personalised_path

    _, spec = _spec(tmp_path, require_dp=False)
    handle_personalise(_global_state(), _cfg(dp=False, **{"personalise-epochs": 1}), spec)
    path = personalised_path(spec, "r1")
    assert str(path.with_name(path.name + ".tmp")) in fsynced, fsynced
    assert load_personalised(path)  # a complete safetensors file
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
