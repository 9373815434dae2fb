"""The fault table's recorder (tests/faultlog.py) and renderer (benchmarks/fault_table.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import faultlog  # noqa: E402

_spec = importlib.util.spec_from_file_location("fault_table", ROOT / "benchmarks" / "fault_table.py")
fault_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fault_table)


def test_record_writes_nothing_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(faultlog.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    faultlog.record("s", "o", "1 s", 0, 1.0)
    assert list(tmp_path.iterdir()) == []


def test_recorded_rows_render_last_per_scenario_in_order(tmp_path, monkeypatch):
    out = tmp_path / "t.jsonl"
    monkeypatch.setenv(faultlog.ENV, str(out))
    faultlog.record("node killed", "first try", "9.0 s", 0, 2.5)
    faultlog.record("stop | resume", "completed", "3 s", 0, None, target=None)
    faultlog.record("node killed", "rerun", "4.0 s", 0, 2.9876, settings="--no-secagg")
    rows = fault_table.load_rows(out)
    assert [r["scenario"] for r in rows] == ["stop | resume", "node killed"]
    assert rows[1]["outcome"] == "rerun" and rows[1]["epsilon"] == 2.988
    table = fault_table.render(rows).splitlines()
    assert table[0].startswith("| Scenario |") and len(table) == 4
    assert table[2] == "| stop \\| resume | completed | 3 s | 0 | nothing trained |"
    assert table[3] == "| node killed (--no-secagg) | rerun | 4.0 s | 0 | 2.988 / 3 |"


def test_render_names_a_missing_file_and_a_bad_line(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        fault_table.load_rows(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"scenario": "a", "outcome": "b"}) + "\n[1, 2]\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not a fault-table row"):
        fault_table.load_rows(bad)
