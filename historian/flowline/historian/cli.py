"""``flowline historian``: set up InfluxDB, run the rollup job, inspect the dead-letter file."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from flowline.core.config import FlowlineConfig, HistorianConfig, load_config
from flowline.core.deadletter import DeadLetterFile
from flowline.core.errors import ConfigError, FlowlineError
from flowline.core.secrets import SecretError, SecretRef
from flowline.historian.connection import Connection
from flowline.historian.errors import HistorianError, HistorianUnavailableError
from flowline.historian.paths import dead_letter_path, rollup_checkpoint_path
from flowline.historian.rollups import RollupJob
from flowline.historian.setup import ROLES, Account, setup_v1

console = Console(stderr=True)


def _load(path: Path) -> tuple[FlowlineConfig, HistorianConfig]:
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if config.historian is None:
        raise click.ClickException(f"{path}: no 'historian' section")
    return config, config.historian


def _account(text: str) -> tuple[str, Account]:
    """``ROLE=NAME:env:VAR`` or ``ROLE=NAME:file:PATH`` -> (role, account with the secret read)."""
    try:
        role, rest = text.split("=", 1)
        name, kind, where = rest.split(":", 2)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected ROLE=NAME:env:VAR or ROLE=NAME:file:PATH") from None
    if role not in ROLES:
        raise click.BadParameter(f"{text!r}: role must be one of {', '.join(ROLES)}")
    if kind not in ("env", "file"):
        raise click.BadParameter(f"{text!r}: the password comes from 'env:VAR' or 'file:PATH'")
    ref = SecretRef(env=where) if kind == "env" else SecretRef(file=Path(where))
    try:
        return role, Account(name, ref.read())
    except SecretError as exc:
        raise click.BadParameter(f"{text!r}: {exc}") from exc


@click.group()
def historian() -> None:
    """The InfluxDB historian: set-up, rollups, dead letters."""


@historian.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path), help="Install config YAML.")
@click.option("--admin-user", default="admin", show_default=True, help="InfluxDB admin account.")
@click.option("--admin-password-env", required=True, metavar="VAR", help="Environment variable with its password.")
@click.option("--account", "accounts", multiple=True, metavar="ROLE=NAME:env:VAR",
              help=f"Create/update a role account ({', '.join(ROLES)}); repeatable.")
def setup(config_path: Path, admin_user: str, admin_password_env: str, accounts: tuple[str, ...]) -> None:
    """Create the database, the retention tiers (raw, rollup_1m, rollup_1h) and least-privilege users
    (InfluxDB 1.x). Safe to re-run: it converges to the config.

    \b
    Example:
      export INFLUX_ADMIN_PASSWORD=… FLOWLINE_WRITER_PASSWORD=… GRAFANA_PASSWORD=…
      flowline historian setup --config flowline.yaml --admin-password-env INFLUX_ADMIN_PASSWORD \\
        --account writer=flowline_writer:env:FLOWLINE_WRITER_PASSWORD \\
        --account grafana=grafana:env:GRAFANA_PASSWORD
    """
    _, hist = _load(config_path)
    if hist.api != "v1":
        raise click.ClickException("setup of InfluxDB 2.x: use flowline.historian.setup_v2.setup_v2 (see its docs)")
    parsed = dict(_account(a) for a in accounts)
    try:
        password = SecretRef(env=admin_password_env).read()
        admin = Connection(hist.url, hist.database, username=admin_user, password=password, timeout_s=hist.timeout_s)
        for statement in setup_v1(admin, hist, parsed):
            click.echo(statement)
    except (FlowlineError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@historian.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path), help="Install config YAML.")
@click.option("--once", is_flag=True, help="Roll up what is due and exit.")
@click.option("--every", default=60.0, show_default=True, help="Seconds between passes when not --once.")
def rollup(config_path: Path, once: bool, every: float) -> None:
    """Roll telemetry up to telemetry_1m and telemetry_1h (mean, min, max, count, last_quality),
    incrementally from a checkpoint under data_dir/historian/.

    \b
    Examples:
      flowline historian rollup --config flowline.yaml --once
      flowline historian rollup --config flowline.yaml --every 60
    """
    config, hist = _load(config_path)
    job = RollupJob.from_config(hist, rollup_checkpoint_path(config))
    try:
        while True:
            try:
                with console.status("rolling up telemetry…"):
                    runs = job.run_once(time.time_ns())
            except HistorianUnavailableError as exc:
                if once:
                    raise
                # The checkpoint only moves past written windows: the next pass picks up from there.
                console.print(f"[yellow]InfluxDB unavailable, retrying in {every:g}s: {exc}")
            else:
                for run in runs:
                    console.print(f"{run.tier}: {run.windows} windows, {run.points} points written")
            if once:
                return
            time.sleep(every)
    except HistorianError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        job.close()


@historian.command("dead-letter")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path), help="Install config YAML.")
@click.option("--tail", default=20, show_default=True, help="How many of the newest records to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON lines (for scripts).")
def dead_letter(config_path: Path, tail: int, as_json: bool) -> None:
    """Show the points InfluxDB refused, with the server's reason.

    \b
    Examples:
      flowline historian dead-letter --config flowline.yaml --tail 50
      flowline historian dead-letter --config flowline.yaml --json | jq .line
    """
    config, _ = _load(config_path)
    records = DeadLetterFile(dead_letter_path(config)).records()
    if as_json:
        for record in records[-tail:]:
            click.echo(json.dumps(record, ensure_ascii=False))
        return
    table = Table("time", "reason", "status", "message", "line", title=f"{len(records)} dead-lettered points")
    for record in records[-tail:]:
        table.add_row(*(str(record.get(k, "")) for k in ("time", "reason", "status", "message", "line")))
    Console().print(table)
