"""No command ends in a traceback: the entry point turns what no command handled into one line.

Run over every command of the CLI (walked from the lazy table, so a new command is covered too).
"""

from __future__ import annotations

import errno
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from flowline.core.cli import COMMANDS, main
from flowline.core.errors import ConfigError
from tests.collectors_helpers import write_site
from tests.conftest import EXAMPLE_SITE


def _leaves(
    group: click.Group, ctx: click.Context, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        if isinstance(command, click.Group):
            yield from _leaves(command, click.Context(command, parent=ctx, info_name=name), (*path, name))
        else:
            yield (*path, name), command


with click.Context(main, info_name="flowline") as _ctx:
    LEAVES = dict(_leaves(main, _ctx))


def test_the_walk_finds_every_command_of_the_table() -> None:
    assert {path[0] for path in LEAVES} == set(COMMANDS)
    assert ("dashboards", "provision") in LEAVES and ("status",) in LEAVES and len(LEAVES) > 20


def _failing(monkeypatch: pytest.MonkeyPatch, command: click.Command, exc: BaseException) -> None:
    def boom() -> None:
        raise exc

    monkeypatch.setattr(command, "params", [])  # reach the callback without each command's required options
    monkeypatch.setattr(command, "callback", boom)


@pytest.mark.parametrize("path", sorted(LEAVES), ids=" ".join)
def test_an_unexpected_error_is_one_line_with_a_pointer_to_v(
    path: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing(monkeypatch, LEAVES[path], RuntimeError("boom"))
    result = CliRunner().invoke(main, list(path))
    assert result.exit_code == 1
    assert result.output == (
        f"Error: flowline {' '.join(path)}: unexpected error: RuntimeError: boom "
        f"(run 'flowline -v {' '.join(path)} ...' to see the traceback)\n"
    )


@pytest.mark.parametrize("path", sorted(LEAVES), ids=" ".join)
def test_a_foreseeable_error_is_one_line_without_traceback(
    path: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing(monkeypatch, LEAVES[path], ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
    result = CliRunner().invoke(main, list(path))
    assert (result.exit_code, result.output) == (1, f"Error: flowline {' '.join(path)}: Connection refused\n")


def test_flowline_errors_keep_their_message_and_v_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    command = LEAVES[("historian", "rollup")]
    _failing(monkeypatch, command, ConfigError("flowline.yaml: historian.url: not a URL"))
    result = CliRunner().invoke(main, ["historian", "rollup"])
    assert result.output == "Error: flowline historian rollup: flowline.yaml: historian.url: not a URL\n"
    _failing(monkeypatch, command, RuntimeError("boom"))
    verbose = CliRunner().invoke(main, ["-v", "historian", "rollup"])
    assert isinstance(verbose.exception, RuntimeError)  # -v lets it through: Python prints the traceback


CONFIG_COMMANDS = sorted(
    path
    for path, command in LEAVES.items()
    if any(p.name in ("config_path", "config_file", "configs") for p in command.params)
)
# Other required options, so that the command gets as far as reading its config.
REQUIRED: dict[tuple[str, ...], list[str]] = {
    ("historian", "setup"): ["--admin-password-env", "X"],
    ("assets", "discover"): ["--opcua", "opc.tcp://127.0.0.1:9", "--site", "{site}"],
    ("export",): ["--out", "{tmp}/out.csv"],
    ("historian", "setup-v2"): ["--admin-token-env", "X", "--org", "flowline", "--token-dir", "{tmp}"],
    ("dashboards", "export"): ["--out", "{tmp}/dashboards"],
    ("dashboards", "provision"): ["--url", "http://127.0.0.1:9", "--token-file", "{token}"],
}


@pytest.mark.parametrize("path", CONFIG_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("config", ["missing", "not-yaml", "wrong-section"])
def test_every_command_with_a_bad_config_file_says_so_in_one_line(
    path: tuple[str, ...], config: str, tmp_path: Path
) -> None:
    """The real commands (nothing patched) with a config that is missing, not YAML, or wrong."""
    file = tmp_path / "flowline.yaml"
    if config == "not-yaml":
        file.write_text("historian: [unclosed\n")
    elif config == "wrong-section":
        file.write_text("historian:\n  url: 12\n  no_such_key: 1\n")
    site = str(write_site(tmp_path))
    token = tmp_path / "token"
    token.write_text("t")
    extra = [arg.format(site=site, tmp=tmp_path, token=token) for arg in REQUIRED.get(path, [])]
    result = CliRunner().invoke(main, [*path, *extra, "--config", str(file)])
    assert result.exit_code in (1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and str(file) in result.output, result.output
    assert "Traceback" not in result.output


def test_python_m_flowline_prints_no_traceback(tmp_path: Path) -> None:
    """Through the real interpreter entry point, as supervisors start the stages."""
    token = tmp_path / "token"
    token.write_text("t")
    proc = subprocess.run(
        [sys.executable, "-m", "flowline.core", "dashboards", "provision", "--url", "http://127.0.0.1:9",
         "--token-file", str(token), "--site", str(EXAMPLE_SITE)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
