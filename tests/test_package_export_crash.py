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


# -- an existing empty --out folder (found by a review of the change, 2026-12-07) ---------------------------


def test_export_to_dot_in_an_empty_working_folder(tmp_path, monkeypatch):
    from serving.package import export_package, load_package

    run = synthetic_run(tmp_path / "run", "health")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    monkeypatch.chdir(pkg)
    export_package(run, Path("."), sites=[])  # `fl-sim export-model RUN --out .` from inside the new, empty folder
    assert load_package(pkg).department == "health"
    assert sorted(os.listdir(".")) == sorted(p.name for p in pkg.iterdir())  # the working folder itself holds it


def test_export_into_an_existing_empty_private_folder_keeps_the_folder(tmp_path):
    from serving.package import export_package

    run = synthetic_run(tmp_path / "run", "health")
    pkg = tmp_path / "pkg"
    pkg.mkdir(mode=0o700)
    before = pkg.stat()
    export_package(run, pkg, sites=[])
    after = pkg.stat()
    assert (after.st_mode & 0o777, after.st_ino) == (before.st_mode & 0o777, before.st_ino)
    assert not [p for p in pkg.iterdir() if p.name.startswith(".")]


def test_an_export_into_an_existing_folder_killed_mid_move_is_cleaned_by_the_rerun(tmp_path):
    run = synthetic_run(tmp_path / "run", "health")
    out = tmp_path / "pkg"
    out.mkdir()
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        real, n = os.rename, [0]
        def dying(src, dst, *a, **k):
            if os.path.dirname(str(dst)) == {str(out)!r}:
                n[0] += 1
                if n[0] == 2:
                    os._exit(9)  # as kill -9, after the first file moved into --out
            return real(src, dst, *a, **k)
        os.rename = dying
        import serving.package as package
        package.export_package({str(run)!r}, {str(out)!r}, sites=[])
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    left = sorted(p.name for p in out.iterdir())
    assert "MANIFEST.json" not in left and len(left) == 2, left  # one package file and the dead staging folder
    from serving.package import export_package, load_package

    export_package(run, out, sites=[])
    assert load_package(out).department == "health"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
