"""Settings every test gets.

Rich (typer's errors, our consoles) wraps at the terminal's width, 80 columns when there is no
terminal. A message naming a file under pytest's tmp folder then wraps at a place that depends
on the length of that folder's path (the CI account's name, pytest-xdist's worker folder): a
test that checks the path is in the message passed or failed by that length (seen: 3 of 6 such
tests failed with a tmp path 6 characters longer; at 250 columns a 250-character message wrapped
inside its box instead). Every test runs with 1000 columns; a test that
checks wrapping sets its own ``COLUMNS`` (monkeypatch or CliRunner env), which wins.
"""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
