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
