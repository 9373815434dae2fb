"""Every console script's ``--help`` describes its positional arguments.

typer 0.20 on click >= 8.2 dropped ``typer.Argument(help=...)``: ``fl-server register --help``
listed ``PUBLIC_KEY`` with no word on which file to give. :func:`privacy.safe_cli.run_app`
restores the help for every command of every tool; these tests read the printed help as a user
gets it (through ``run_app``, the console scripts' entry point).
"""

from __future__ import annotations

import importlib

import click
import pytest
import typer.main
from typer.models import ArgumentInfo
from typer.utils import get_params_from_function

from privacy.safe_cli import run_app

TOOLS = {
    "fl-server": "server.cli",
    "fl-client": "clients.cli",
    "fl-serve": "serving.cli",
    "fl-pki": "privacy.pki_cli",
    "fl-sim": "simulations.cli",
}


def _commands_with_arguments():
    """(tool, command path, argument name, declared help) for each documented positional argument."""
    found = []
    for tool, module in TOOLS.items():
        app = importlib.import_module(module).app
        stack = [((), typer.main.get_command(app))]
        while stack:
            path, command = stack.pop()
            for name, sub in getattr(command, "commands", {}).items():
                stack.append(((*path, name), sub))
            function = getattr(command.callback, "__wrapped__", None)
            if function is None:
                continue
            for name, meta in get_params_from_function(function).items():
                if isinstance(meta.default, ArgumentInfo) and meta.default.help:
                    found.append((tool, path, name, meta.default.help))
    return found


CASES = _commands_with_arguments()


def test_the_tools_declare_positional_arguments():
    """The walk finds the arguments this test is about (it cannot pass on an empty list)."""
    tools = {tool for tool, *_ in CASES}
    assert {"fl-server", "fl-client", "fl-serve", "fl-pki", "fl-sim"} <= tools, tools
    assert any(path == ("register",) and name == "public_key" for tool, path, name, _ in CASES if tool == "fl-server")


@pytest.mark.parametrize("tool, path, name, declared", CASES,
                         ids=[f"{t}-{'-'.join(p)}-{n}" for t, p, n, _ in CASES])
def test_argument_help_is_printed(tool, path, name, declared, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per argument: the declared help is not wrapped
    app = importlib.import_module(TOOLS[tool]).app
    with pytest.raises(SystemExit) as exit_info:
        run_app(app, tool, [*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    first_words = " ".join(declared.split()[:5])
    assert first_words in " ".join(out.split()), f"{tool} {' '.join(path)} --help lacks the help of {name}:\n{out}"


def test_plain_click_commands_are_left_alone():
    from privacy.safe_cli import restore_argument_help

    @click.command()
    @click.argument("thing")
    def plain(thing):
        """A click command: no typer declaration to read."""

    restore_argument_help(plain)
    assert plain.params[0].name == "thing" and getattr(plain.params[0], "help", None) is None
