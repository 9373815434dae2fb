"""No private record on the terminal: CLI errors are messages, never tracebacks with locals."""

import csv
import os
import subprocess
import sys

import pytest
import typer

from privacy.safe_cli import describe, run_app

#: A value only the one-patient hospital's record holds (it must never be printed).
MARKER = "271.125"


def _tiny_hospital_file(tmp_path):
    from citydata import load_department

    path = load_department("health").export(tmp_path / "health.csv")
    rows = list(csv.DictReader(open(path)))
    tiny = {**rows[0], "dataset": "Tiny", "chol": MARKER, "id": "9999"}
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([*rows, tiny])
    return path


@pytest.mark.parametrize("debug", [False, True])
def test_bad_data_file_under_fl_sim_prints_no_record(tmp_path, debug):
    """A hospital with a single patient: a clear error naming file, column and fix; no patient row."""
    data = _tiny_hospital_file(tmp_path)
    cmd = [sys.executable, "-c", "from simulations.cli import main; main()", "baselines", "-d", "health",
           "--data", str(data), "--out", str(tmp_path / "out"), *(["--debug"] if debug else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2  # a data file the user can fix: an input error (fl-sim's exit status)
    assert "hospital 'Tiny' has only 1 patient" in out and "; fix: " in out
    assert MARKER not in out  # neither the message nor a traceback shows the record
    assert ("Traceback" in out) == debug  # --debug shows the trace (without locals)


def _app(exc: BaseException) -> typer.Typer:
    app = typer.Typer(pretty_exceptions_show_locals=False)

    @app.command()
    def boom(n: int = 1) -> None:
        rows = ["patient 63 male chol 271.125"]  # noqa: F841 - a local a pretty traceback would print
        raise exc

    return app


def test_foreign_exception_message_is_withheld(capsys):
    with pytest.raises(SystemExit) as ended:
        run_app(_app(ValueError(f"could not convert string to float: '{MARKER}'")), "fl-test", ["--n", "2"])
    assert ended.value.code == 1
    err = capsys.readouterr().err
    assert "builtins.ValueError" in err and "test_safe_cli.py" in err and "--debug" in err
    assert MARKER not in err and "Traceback" not in err


def test_own_exception_message_is_shown():
    from citydata.base import DataFileError

    exc = DataFileError("f.csv", "column 'age' is not numeric", "fix it")
    assert describe(exc) == f"DataFileError: {exc}" and "column 'age'" in describe(exc)


def test_exit_codes_and_usage_errors_pass_through(capsys):
    with pytest.raises(SystemExit) as ended:
        run_app(_app(typer.Exit(3)), "fl-test", [])
    assert ended.value.code == 3
    with pytest.raises(SystemExit) as ended:
        run_app(_app(typer.Exit(0)), "fl-test", ["--n", "not-a-number"])
    assert ended.value.code == 2 and "not-a-number" in capsys.readouterr().err


def test_a_failed_node_task_tells_the_coordinator_no_record_value():
    """The warm worker's error reply (sent to the coordinator) names the type and place, not a library message."""
    from clients.warm import failure_reason

    try:
        float(f"{MARKER}abc")  # a library error quoting a cell value
    except ValueError as exc:
        reason = failure_reason(exc)
    assert "ValueError" in reason and "test_safe_cli.py" in reason and MARKER not in reason


def test_own_packages_are_every_package_the_project_ships():
    """A package moved or added (e.g. citydata, contract) must be trusted for messages: its errors name the fix."""
    import tomllib
    from pathlib import Path

    from privacy.safe_cli import OWN_PACKAGES

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    shipped = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert shipped == set(OWN_PACKAGES)


def test_cli_output_off_a_terminal_is_not_wrapped_at_80_columns(tmp_path):
    """``fl-server nodes > file`` split each fingerprint over 7 lines and statuses as 'register'/'ed'."""
    import json
    import subprocess
    import sys

    sd = tmp_path / "state"
    sd.mkdir()
    (sd / "nodes.json").write_text(json.dumps({"4242424242424242424": {"name": "health-VA Long Beach",
                                                                       "fingerprint": "SHA256:" + "A" * 43}}))
    code = ("import sys; from server import cli; "
            "cli.flwr = lambda sd, *a, **k: {'success': True, 'nodes': [{'node-id': '4242424242424242424', "
            "'status': 'registered', 'online-at': 'N/A', 'offline-at': 'N/A'}]}; "
            "sys.argv = ['fl-server', 'nodes', '--state-dir', sys.argv[1]]; cli.main()")
    env = {k: v for k, v in __import__("os").environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-c", code, str(sd)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("SHA256:" + "A" * 43 in ln and "health-VA Long Beach" in ln and "registered" in ln for ln in lines), out.stdout


def test_warnings_print_once_without_source_lines(capsys):
    import warnings

    import typer

    from citydata.base import DataQualityWarning

    app = typer.Typer()

    @app.command()
    def main() -> None:
        for place in range(2):  # two calling places, as the coordinator's and the node's loads
            if place == 0:
                warnings.warn("cleveland.csv: 1 duplicate row dropped", DataQualityWarning, stacklevel=1)
            else:
                warnings.warn("cleveland.csv: 1 duplicate row dropped", DataQualityWarning, stacklevel=1)

    with warnings.catch_warnings():  # other test modules ignore UserWarnings process-wide; restores showwarning
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as ended:
            run_app(app, "fl-test", [])
    assert ended.value.code == 0
    err = capsys.readouterr().err
    assert err.count("cleveland.csv: 1 duplicate row dropped") == 1
    assert "fl-test: warning: DataQualityWarning: cleveland.csv" in err and "warnings.warn" not in err and ".py:" not in err
