"""``flowline historian``: set up InfluxDB, run the rollup job, inspect the dead-letter file."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from flowline.core.cli import service_logging
from flowline.core.config import FlowlineConfig, HistorianConfig, load_config
from flowline.core.deadletter import DeadLetterFile
from flowline.core.errors import ConfigError, FlowlineError
from flowline.core.secrets import SecretError, SecretRef
from flowline.core.status import ProcessStatus
from flowline.historian.connection import Connection, error_message
from flowline.historian.errors import HistorianError, HistorianUnavailableError
from flowline.historian.paths import dead_letter_path, rollup_checkpoint_path
from flowline.historian.rollups import RollupJob
from flowline.historian.setup import ROLES, Account, setup_v1
from flowline.historian.tiers import TIERS, TIERS_BY_NAME

console = Console(stderr=True)
log = logging.getLogger("flowline.historian.rollup")


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
@click.option(
    "--account",
    "accounts",
    multiple=True,
    metavar="ROLE=NAME:env:VAR",
    help=f"Create/update a role account ({', '.join(ROLES)}); repeatable.",
)
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
        raise click.ClickException("setup of InfluxDB 2.x: use 'flowline historian setup-v2'")
    parsed = dict(_account(a) for a in accounts)
    try:
        password = SecretRef(env=admin_password_env).read()
        admin = Connection(hist.url, hist.database, username=admin_user, password=password, timeout_s=hist.timeout_s)
        for statement in setup_v1(admin, hist, parsed):
            click.echo(statement)
    except (FlowlineError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@historian.command("setup-v2")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path), help="Install config YAML.")
@click.option("--admin-token-env", required=True, metavar="VAR", help="Environment variable with an operator token.")
@click.option("--org", required=True, help="The InfluxDB organization.")
@click.option("--role", "roles", multiple=True, type=click.Choice(ROLES),
              help="Create an API token for this role; repeatable (default: every role).")  # fmt: skip
@click.option("--token-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the new tokens, one file influxdb_<role>_token each (mode 0600).")  # fmt: skip
def setup_v2_command(
    config_path: Path, admin_token_env: str, org: str, roles: tuple[str, ...], token_dir: Path
) -> None:
    """InfluxDB 2.x: a bucket per retention tier, the DBRP mappings InfluxQL and the 1.x-compatible
    API use, and one least-privilege API token per role. Buckets and mappings converge; tokens are new.

    \b
    Example:
      export INFLUX_OPERATOR_TOKEN=…
      flowline historian setup-v2 --config flowline.yaml --admin-token-env INFLUX_OPERATOR_TOKEN \\
        --org flowline --token-dir docker/secrets
    """
    import urllib3
    from influxdb_client.rest import ApiException

    from flowline.historian.setup_v2 import setup_v2

    _, hist = _load(config_path)
    try:
        result = setup_v2(hist.url, SecretRef(env=admin_token_env).read(), org, hist, roles or ROLES)
    except SecretError as exc:
        raise click.ClickException(str(exc)) from exc
    except ApiException as exc:
        raise click.ClickException(f"InfluxDB at {hist.url} answered {exc.status}: {error_message(exc.body)}") from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise click.ClickException(f"InfluxDB at {hist.url} is unreachable: {exc}") from exc
    for line in result.done:
        click.echo(line)
    token_dir.mkdir(parents=True, exist_ok=True)
    for role, token in result.tokens.items():
        path = token_dir / f"influxdb_{role}_token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        path.chmod(0o600)
        click.echo(f"token for role {role} written to {path}")


@historian.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path), help="Install config YAML.")
@click.option("--once", is_flag=True, help="Roll up what is due and exit.")
@click.option("--every", default=60.0, show_default=True, help="Seconds between passes when not --once.")
@click.option(
    "--tier",
    "tier_names",
    multiple=True,
    type=click.Choice(list(TIERS_BY_NAME)),
    help="Only these tiers (repeatable; default: all).",
)
def rollup(config_path: Path, once: bool, every: float, tier_names: tuple[str, ...]) -> None:
    """Roll telemetry up to telemetry_1m and telemetry_1h (mean, min, max, count, last_quality),
    incrementally from a checkpoint under data_dir/historian/. Connects with rollup.historian (the
    rollup role: read and write) when the config has it, else with the historian section.

    \b
    Examples:
      flowline historian rollup --config flowline.yaml --once
      flowline historian rollup --config flowline.yaml --every 60
    """
    config, hist = _load(config_path)
    if not once:
        service_logging()  # a long-running job: its lines carry timestamps
    # The rollup role's account (reads raw, writes the tiers), not the DMZ writer's write-only one.
    tiers = tuple(TIERS_BY_NAME[name] for name in tier_names) or TIERS
    job = RollupJob.from_config(config.rollup.historian or hist, rollup_checkpoint_path(config), tiers)
    status = ProcessStatus(config.data_dir, "rollup").start()
    try:
        while True:
            try:
                with console.status("rolling up telemetry…"):
                    runs = job.run_once(time.time_ns())
            except HistorianUnavailableError as exc:
                status.connected(hist.url, "sink", False, error=str(exc))
                if once:
                    raise
                # The checkpoint only moves past written windows: the next pass picks up from there.
                log.warning("InfluxDB unavailable, retrying in %gs: %s", every, exc)
            else:
                status.ok(hist.url, "sink")
                status.extra["last_pass"] = {run.tier: {"windows": run.windows, "points": run.points} for run in runs}
                for run in runs:
                    line = f"{run.tier}: {run.windows} windows, {run.points} points written"
                    if once:
                        console.print(line)
                    else:
                        log.info("%s", line)
            if once:
                return
            time.sleep(every)
    except HistorianError as exc:
        status.fail(str(exc))
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        job.close()
        status.stop()


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
