"""A package export killed part-way leaves no partial package in --out.

Found by a reliability review (2026-12-07, L4): the files were written one by one into the package
folder and the clean-up ran only for Python exceptions, so after a kill -9 at the second file the
folder held ``model.safetensors`` and a ``.tmp``, and the rerun refused it ("not empty").
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from serve_helpers import synthetic_run

ROOT = Path(__file__).resolve().parents[1]


def test_an_export_killed_between_two_files_leaves_no_package_and_the_rerun_works(tmp_path):
    run = synthetic_run(tmp_path / "run", "health")
    out = tmp_path / "pkg"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import serving.package as package
        real, calls = package.write_atomic, []
        def dying(path, data, *a, **k):
            calls.append(path)
            if len(calls) == 2:
                os._exit(9)  # as kill -9: no Python clean-up runs
            return real(path, data, *a, **k)
        package.write_atomic = dying
        package.export_package({str(run)!r}, {str(out)!r}, sites=[])
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    from serving.package import export_package, load_package

    export_package(run, out, sites=[])
    assert load_package(out).department == "health"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pkg")] == []  # the dead export's staging is gone
