"""An unknown sub-command is answered with one "Did you mean ...?" (click's own), in every CLI and sub-group.

typer added its suggestion to click's, so each wrong command name printed it twice.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

runner = CliRunner(env={"COLUMNS": "250"})


def _app(module: str):
    import importlib

    return importlib.import_module(module).app


@pytest.mark.parametrize("module,args,meant", [
    ("simulations.cli", ["expor"], "export"),
    ("server.cli", ["statu"], "start"),
    ("privacy.pki_cli", ["shw"], "show"),
    ("clients.cli", ["ap"], "app"),
    ("clients.cli", ["app", "lst"], "list"),
    ("clients.cli", ["audit", "shw"], "show"),
    ("server.cli", ["audit", "verfy"], "verify"),
])
def test_unknown_command_is_answered_with_one_suggestion(module, args, meant):
    res = runner.invoke(_app(module), args)
    text = res.output
    assert res.exit_code == 2, text
    assert f"Did you mean '{meant}'?" in text and text.count("Did you mean") == 1, text
