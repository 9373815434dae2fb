"""server.artefacts.write_atomic: a file is replaced only by a complete one, and a failed write leaves no temporary file."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.artefacts import write_atomic


@pytest.mark.parametrize("fail_at", ["write", "rename"])
def test_failed_write_keeps_the_earlier_file_and_leaves_no_temp(tmp_path, monkeypatch, fail_at):
    target = tmp_path / "results.json"
    write_atomic(target, b'{"earlier": 1}')

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if fail_at == "rename":
        monkeypatch.setattr(Path, "replace", full)
    else:
        monkeypatch.setattr("os.fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, b'{"new": 2}')
    assert target.read_bytes() == b'{"earlier": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


_HALF_WRITES = r'''
import builtins, errno, io, sys
def failing(opener):
    def _open(file, mode="r", *args, **kwargs):
        fh = opener(file, mode, *args, **kwargs)
        if "w" in mode and "results.json" in str(file):  # the write stops half-way: a full disk
            real_write = fh.write
            def write(data):
                real_write(data[: len(data) // 2])
                fh.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            fh.write = write
        return fh
    return _open
builtins.open, io.open = failing(builtins.open), failing(io.open)
sys.argv[0] = "fl-sim"
from simulations.cli import main
main()
'''


def test_a_run_whose_results_json_write_fails_keeps_the_earlier_file_whole(tmp_path):
    """The ServerApp wrote results.json in place: a full disk (or a kill) mid-write left partial JSON and
    destroyed the earlier file (independent reliability review, 2026-12-07)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    earlier = json.dumps({"run_id": "earlier", "status": "completed", "rounds": []})
    (out / "results.json").write_text(earlier)
    r = subprocess.run([sys.executable, "-c", _HALF_WRITES, "run", "-d", "health", "-r", "1", "--engine", "inprocess",
                        "--no-secagg", "--personalise-epochs", "0", "-o", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0, r.stdout[-500:]
    assert (out / "results.json").read_text() == earlier
    assert "No space left on device" in r.stderr, r.stderr[-800:]  # named (safe_cli.describe), not hidden
