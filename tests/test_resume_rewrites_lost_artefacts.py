"""A finished simulation whose final files were lost (killed in its last seconds) is resumed: nothing trains.

Found by a reliability review (2026-12-07, M1): a run killed after its last checkpoint but before
its report was written could not be completed: `fl-sim run --resume` refused it ("finished all 1 of
its rounds ... resuming would only rewrite its results, model and report"), which is what it needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim_helpers import fl_sim


def _rows(run_dir: Path) -> int:
    from privacy.ledger import PrivacyLedger

    return sum(len(PrivacyLedger(p).releases()) for p in (run_dir / "ledgers").glob("*.sqlite"))


@pytest.mark.parametrize("damage", ["report deleted", "results cut", "model deleted"])
def test_a_finished_run_with_a_lost_final_file_is_completed_by_resume(tmp_path, capsys, monkeypatch, damage):
    run_dir = tmp_path / "run"
    args = ["run", "-d", "health", "-r", "1", "--engine", "inprocess", "-o", run_dir]
    code, out, err = fl_sim(args, capsys, monkeypatch)
    assert code == 0, (out, err)
    results = json.loads((run_dir / "results.json").read_text())
    rows = _rows(run_dir)
    if damage == "report deleted":
        (run_dir / "report.html").unlink()
    elif damage == "results cut":
        (run_dir / "results.json").write_bytes((run_dir / "results.json").read_bytes()[:100])
    else:
        (run_dir / "model.safetensors").unlink()
    code, out, err = fl_sim([*args, "--resume"], capsys, monkeypatch)
    assert code == 0, (out, err)
    assert "writing them again from its checkpoint (nothing is trained)" in " ".join(out.split()), out
    again = json.loads((run_dir / "results.json").read_text())
    assert again["rounds"][-1]["round"] == results["rounds"][-1]["round"] == 1
    assert (run_dir / "report.html").read_text().rstrip().endswith("</html>") and (run_dir / "model.safetensors").is_file()
    assert _rows(run_dir) == rows  # no release: nothing trained, nothing evaluated on a node
    code, out, err = fl_sim([*args, "--resume"], capsys, monkeypatch)  # all there again: refused as before
    assert code == 2 and "finished all 1" in err, (out, err)
