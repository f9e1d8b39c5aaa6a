"""The `flowline` entry point: every command listed with its help, imported only when it runs."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from flowline.core.cli import COMMANDS, main

# What the command groups pull in; `flowline --help` must not pay for them.
HEAVY = ("asyncua", "pandas", "scipy", "statsmodels", "paho", "influxdb_client")


def test_help_lists_every_command_with_its_one_line_help() -> None:
    result = CliRunner().invoke(main, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    listed = result.output.split("Commands:", 1)[1]
    for name, lazy in COMMANDS.items():
        line = next((row for row in listed.splitlines() if row.split()[:1] == [name]), None)
        assert line is not None, f"{name} missing from:\n{listed}"
        assert line.split(None, 1)[1].rstrip(".") in lazy.short_help, line


def test_help_imports_no_command_module() -> None:
    probe = (
        "import sys\n"
        "from flowline.core.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]", out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_help_works_and_matches_the_listed_help(name: str) -> None:
    result = CliRunner().invoke(main, [name, "--help"], prog_name="flowline")
    assert result.exit_code == 0, result.output
    assert f"Usage: flowline {name}" in result.output
    command = main.get_command(click.Context(main), name)
    assert command is not None
    # the mapping's help is what the command itself would show in the list
    listed = click.Command(name, help=COMMANDS[name].short_help).get_short_help_str(1000)
    assert command.get_short_help_str(1000) == listed


def test_unknown_command_is_refused_clearly() -> None:
    result = CliRunner().invoke(main, ["nope"])
    assert result.exit_code == 2
    assert "No such command 'nope'" in result.output
