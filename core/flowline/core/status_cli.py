"""``flowline status``: every process's status file in the terminal, for people without Grafana at hand.

It reads files only (``<data_dir>/status/*.json``, see flowline/status.py): safe to run on an OT host,
it opens no connection anywhere. ``--check`` is the health probe of the Docker images and the
systemd units.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from flowline.core.config import load_config
from flowline.core.errors import ConfigError
from flowline.core.status import link_summary, parse_iso, process_name, read_all, since_text, verdict

DEFAULT_DATA_DIR = Path("/var/lib/flowline")
_STATE_STYLE = {"running": "green", "degraded": "yellow", "stopped": "dim"}  # anything else: bold red


def _data_dirs(configs: tuple[Path, ...], data_dirs: tuple[Path, ...]) -> list[Path]:
    """Where to look: the given folders and config files, else $FLOWLINE_CONFIG's, else the default."""
    folders = list(data_dirs)
    paths = list(configs)
    if not folders and not paths:
        env = os.environ.get("FLOWLINE_CONFIG")
        if env and Path(env).exists():
            paths.append(Path(env))
        else:
            folders.append(DEFAULT_DATA_DIR)
    for path in paths:
        try:
            folders.append(load_config(path).data_dir)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
    return list(dict.fromkeys(folders))


def _size(n: object) -> str:
    if not isinstance(n, int | float):
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def _when(iso: object, now: float) -> str:
    return "never" if parse_iso(iso) is None else since_text(iso, now).removeprefix("since ")


def render(docs: list[dict[str, Any]], folders: list[Path], now: float) -> Text:
    """One block per process (readable at any terminal width): state, links, spools, last error."""
    if not docs:
        where = ", ".join(str(folder / "status") for folder in folders)
        return Text(f"No status files under {where}: no Flowline process has run with this data_dir.")
    out = Text(f"Flowline processes at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(now))} UTC\n\n")
    for doc in docs:
        health = verdict(doc, now)
        state = str(doc.get("state", "?"))
        if not health.healthy and state in ("running", "degraded") and "status file" in health.summary:
            state = "stale"
        out.append(f"{doc.get('process', '?')}  ", style="bold")
        out.append(state.upper(), style=_STATE_STYLE.get(state, "bold red"))
        out.append(
            f"  pid {doc.get('pid', '?')} on {doc.get('host', '?')}, started {_when(doc.get('started_at'), now)}, "
            f"updated {_when(doc.get('updated_at'), now)}\n"
        )
        if state == "stale":
            out.append(f"  {health.summary.split(': ', 1)[1]}\n", style="bold red")
        for name, link in (doc.get("links") or {}).items():
            style = "red" if link.get("connected") is False else ""
            out.append(f"  {link.get('kind', 'link')} ", style="dim")
            out.append(link_summary(name, link, now), style=style)
            if link.get("last_ok"):
                out.append(f"; last ok {_when(link['last_ok'], now)}")
            out.append("\n")
        for name, spool in (doc.get("spools") or {}).items():
            out.append("  spool ", style="dim")
            out.append(f"{name}: {_size(spool.get('depth_bytes'))} waiting\n")
        out.append("  data ", style="dim")
        out.append(f"last read {_when(doc.get('last_read'), now)}, last write {_when(doc.get('last_write'), now)}\n")
        error = doc.get("last_error") or {}
        if error.get("message"):
            out.append("  last error ", style="dim")
            out.append(f"{_when(error.get('at'), now)}: {error['message']}\n", style="yellow")
        out.append("\n")
    return out


def _pid1_process() -> str | None:
    """The process this container runs (its PID 1), for the image's health check."""
    try:
        args = Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    return process_name(args)


def _check(docs: list[dict[str, Any]], name: str, folders: list[Path], now: float) -> None:
    if name == "pid1":
        pid1 = _pid1_process()
        if pid1 is None:
            click.echo("healthy: this container's main command keeps no status file")
            sys.exit(0)
        name = pid1
    chosen = docs if name == "all" else [d for d in docs if d.get("process") == name]
    if not chosen:
        where = ", ".join(str(f / "status") for f in folders)
        click.echo(f"unhealthy: no status file for {name!r} under {where} (not started yet?)")
        sys.exit(1)
    verdicts = [verdict(doc, now) for doc in chosen]
    for v in verdicts:
        click.echo(("healthy: " if v.healthy else "unhealthy: ") + v.summary)
    sys.exit(0 if all(v.healthy for v in verdicts) else 1)


@click.command()
@click.option(
    "--config", "configs", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
    help="A Flowline config: read the status files under its data_dir (repeatable).",
)
@click.option(
    "--data-dir", "data_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
    help="Read the status files under this data_dir (repeatable). Default: $FLOWLINE_CONFIG's, else /var/lib/flowline.",
)
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds until Ctrl-C.")
@click.option(
    "--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.2), help="Seconds between redraws."
)
@click.option(
    "--check", "check", metavar="PROCESS",
    help="Exit 0 if PROCESS is healthy, 1 if not, with the reason in one line. 'all' checks every process; "
    "'pid1' the one this container runs (the Docker health check).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status files as one JSON list.")
def status(
    configs: tuple[Path, ...], data_dirs: tuple[Path, ...], watch: bool, interval: float, check: str | None,
    as_json: bool,
) -> None:
    """Show every Flowline process's health from its status file: connections, spool depth, last error.

    Reads files only: it opens no connection into OT or anywhere else.

    \b
    Examples:
      flowline status --config /etc/flowline/ot.yaml
      flowline status --data-dir /var/lib/flowline --watch
      flowline status --check collector-mqtt      # exit 0 healthy, 1 not (for supervisors)
    """
    folders = _data_dirs(configs, data_dirs)

    def docs() -> list[dict[str, Any]]:
        return [doc for folder in folders for doc in read_all(folder)]

    if check is not None:
        _check(docs(), check, folders, time.time())
    if as_json:
        click.echo(json.dumps(docs(), indent=1))
        return
    console = Console()
    if not watch:
        console.print(render(docs(), folders, time.time()))
        return
    hint = Text("Ctrl-C to stop", style="dim")
    try:
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                live.update(Group(render(docs(), folders, time.time()), hint), refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        return
