"""fl-serve and benchmarks/serve_load.py: a user's bad option values are exit 2, naming the option (round 3).

``--site`` not a site of the department, a ``--personalised`` path that is missing, a folder,
not safetensors or without cityfed's metadata, an invalid ``--date-format``, and a PACKAGE path
that does not exist or is not a folder: each is refused with exit 2, the message naming the
option, the value and one fix, with no traceback and before anything is served. A damaged
package (or a personalised file of another site/run) stays exit 1, as the README documents.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import KEY, synthetic_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def health_pkg(tmp_path_factory):
    from serving.package import export_package

    d = tmp_path_factory.mktemp("round3")
    export_package(synthetic_run(d / "run", "health"), d / "pkg", sites=[])
    return d / "pkg"


def _serve(monkeypatch, *args, env=None):
    """Invoke fl-serve in-process; ``uvicorn.run`` is replaced so nothing is ever served."""
    import uvicorn
    from typer.testing import CliRunner

    from serving.cli import KEY_ENV, app

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: served.append(a))
    monkeypatch.setenv(KEY_ENV, KEY)
    res = CliRunner().invoke(app, [*map(str, args), "--port", "18993"], env={"COLUMNS": "300", **(env or {})})
    return res, " ".join(res.output.split()), served


def _refused(res, out, served, *words):
    assert res.exit_code == 2, out
    assert "Traceback" not in out and not served, out
    assert "fix" in out.lower(), out
    for w in words:
        assert w in out, (w, out)


# -- D5: --site ---------------------------------------------------------------------------------
def test_unknown_site_is_exit_2_naming_the_option_the_value_and_the_sites(health_pkg, monkeypatch):
    res, out, served = _serve(monkeypatch, health_pkg, "--site", "Nowhere")
    _refused(res, out, served, "--site", "'Nowhere'", "Cleveland", "Hungary")


def test_a_site_not_in_the_data_file_is_exit_2_naming_site_and_data(health_pkg, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from simulations.cli import app as sim_app

    data = tmp_path / "hungary.csv"
    made = CliRunner().invoke(sim_app, ["export", "-d", "health", "--site", "Hungary", "-o", str(data)])
    assert made.exit_code == 0, made.output
    res, out, served = _serve(monkeypatch, health_pkg, "--site", "Cleveland", "--data", data)
    # an operator's file: its site column's values are counted, not listed (they could be record values)
    _refused(res, out, served, "--site", "'Cleveland'", str(data), "1 distinct value(s)", "'dataset'")
    assert "Hungary" not in out, out


# -- D6: --personalised ---------------------------------------------------------------------------
def _personalised_paths(tmp_path: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "a-folder"
    folder.mkdir()
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all" * 10)
    nometa = tmp_path / "nometa.safetensors"
    save_file({"w": torch.zeros(2)}, str(nometa))
    return {"missing": (tmp_path / "nonexistent.safetensors", "not found"),
            "a folder": (folder, "a folder"),
            "garbage": (garbage, "not a safetensors file"),
            "no metadata": (nometa, "no run-id")}


@pytest.mark.parametrize("case", ["missing", "a folder", "garbage", "no metadata"])
def test_a_bad_personalised_path_is_exit_2(health_pkg, tmp_path, monkeypatch, case):
    path, words = _personalised_paths(tmp_path)[case]
    res, out, served = _serve(monkeypatch, health_pkg, "--site", "Cleveland", "--personalised", path)
    _refused(res, out, served, "--personalised", str(path), words)


# -- D7: --date-format ----------------------------------------------------------------------------
@pytest.mark.parametrize("value, words", [("%Q%Q", "no year"), ("XYZ", "unknown date format"),
                                          ("%Y-%m", "no day")])
def test_a_bad_date_format_is_exit_2_naming_the_option_and_the_fix(health_pkg, monkeypatch, value, words):
    res, out, served = _serve(monkeypatch, health_pkg, "--site", "Cleveland", "--date-format", value)
    _refused(res, out, served, "--date-format", repr(value), words, "DMY", "MDY", "strftime")


def test_a_bad_date_format_is_refused_before_the_package_is_read(tmp_path, monkeypatch):
    res, out, served = _serve(monkeypatch, tmp_path / "no-package", "--site", "Cleveland", "--date-format", "%Q%Q")
    _refused(res, out, served, "--date-format", "'%Q%Q'")
    assert "MANIFEST" not in out, out


def test_a_bad_cityfed_date_format_is_exit_2_naming_the_variable(health_pkg, monkeypatch):
    res, out, served = _serve(monkeypatch, health_pkg, "--site", "Cleveland", env={"CITYFED_DATE_FORMAT": "%Q%Q"})
    _refused(res, out, served, "CITYFED_DATE_FORMAT", "'%Q%Q'")


# -- the PACKAGE argument's path ----------------------------------------------------------------------
def test_a_package_path_that_is_missing_or_a_file_is_exit_2(health_pkg, tmp_path, monkeypatch):
    res, out, served = _serve(monkeypatch, tmp_path / "nonexistent", "--site", "Cleveland")
    _refused(res, out, served, "PACKAGE", str(tmp_path / "nonexistent"), "not found")
    afile = tmp_path / "a-file.json"
    afile.write_text("{}")
    res, out, served = _serve(monkeypatch, afile, "--site", "Cleveland")
    _refused(res, out, served, "PACKAGE", str(afile), "not a folder")


def test_a_damaged_package_stays_exit_1(health_pkg, tmp_path, monkeypatch):
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(health_pkg, pkg)
    (pkg / "model-card.json").write_text((pkg / "model-card.json").read_text() + " ")
    res, out, served = _serve(monkeypatch, pkg, "--site", "Cleveland")
    assert res.exit_code == 1 and "model-card.json" in out and "Traceback" not in out and not served, out


# -- D10: benchmarks/serve_load.py ------------------------------------------------------------------
def _bench(*args, timeout=120):
    env = {**os.environ, "COLUMNS": "300"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("args, words", [
    (["--package", "/nonexistent-cityfed-pkg"], ["--package", "/nonexistent-cityfed-pkg", "not found"]),
    (["--site", "Nowhere", "--requests", "5"], ["--site", "'Nowhere'", "Cleveland"]),
    (["--requests", "0"], ["--requests", "0"]),
    (["--clients", "0"], ["--clients", "0"]),
    (["--max-seconds", "nan"], ["--max-seconds", "nan"]),
])
def test_serve_load_bad_arguments_exit_2_without_a_traceback(args, words):
    res = _bench(*args)
    err = " ".join(res.stderr.split())
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr and "fix" in err.lower(), err
    for w in words:
        assert w in err, (w, err)


def test_serve_load_damaged_package_exit_2_with_the_message(health_pkg, tmp_path):
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(health_pkg, pkg)
    (pkg / "model-card.json").write_text((pkg / "model-card.json").read_text() + " ")
    res = _bench("--package", pkg)
    err = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in res.stderr and "model-card.json" in err, res.stderr[-3000:]
