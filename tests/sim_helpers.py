"""Running ``fl-sim`` in a test as its console script runs it (one helper for the fl-sim CLI tests)."""

from __future__ import annotations

import pytest

import simulations.cli as cli
from privacy.safe_cli import DEBUG_ENV, run_app


def fl_sim(argv, capsys, monkeypatch) -> tuple[int, str, str]:
    """fl-sim as its console script runs it (:func:`privacy.safe_cli.run_app`).

    Parameters
    ----------
    argv : list
        The arguments (anything ``str()`` turns into one).
    capsys, monkeypatch
        pytest's fixtures of the calling test.

    Returns
    -------
    tuple of (int, str, str)
        Exit status, stdout and stderr (whitespace collapsed).
    """
    monkeypatch.setenv(DEBUG_ENV, "0")
    # the consoles' width is fixed when simulations.cli is first imported (COLUMNS then, or 200 off a
    # terminal): pinned wide here, so a long tmp_path (pytest-xdist's popen-gwN) is never wrapped
    monkeypatch.setattr(cli.console, "width", 400)
    monkeypatch.setattr(cli.err_console, "width", 400)
    with pytest.raises(SystemExit) as ex:
        run_app(cli.app, "fl-sim", argv=[str(a) for a in argv])
    cap = capsys.readouterr()
    return ex.value.code, " ".join(cap.out.split()), " ".join(cap.err.split())


def assert_input_error(code: int, out: str, err: str) -> None:
    """fl-sim's input-error rule: exit 2 and one ``error: WHAT; fix: HOW`` line, no traceback, no hidden message.

    Parameters
    ----------
    code, out, err
        What :func:`fl_sim` returned.
    """
    assert code == 2, (out, err)
    assert err.count("error: ") == 1 and "; fix: " in err, err
    assert "Traceback" not in err and "not shown" not in err, err


def copy_run(src, dst):
    """A copy of the run folder ``src`` at ``dst`` (a finished run a test changes without touching the shared one)."""
    import shutil

    shutil.copytree(src, dst)
    return dst


def ledger_bytes(run_dir) -> dict:
    """Every ledger file of ``run_dir/ledgers`` as bytes, by name: equal before and after = nothing released."""
    return {p.name: p.read_bytes() for p in sorted((run_dir / "ledgers").glob("*.sqlite"))}
