"""``flowline sim``: the plant simulator (live OPC UA + MQTT, backfill, fault ground truth)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from flowline.core.config import load_config
from flowline.core.errors import FlowlineError
from flowline.core.secrets import SecretRef
from flowline.core.spool import SpoolLockedError
from flowline.inventory import Site, SiteFileError, load_site
from flowline.lab.pki import CertFiles, CertificateAuthority
from flowline.lab.sim.backfill import BackfillError, backfill
from flowline.lab.sim.mqtt_publisher import MqttPublisher, MqttPublishError, MqttSettings
from flowline.lab.sim.opcua_server import POLICIES, OpcUaServerError, SimOpcUaServer, server_certificate
from flowline.lab.sim.plant import Plant
from flowline.lab.sim.runner import Simulator

BACKFILL_SPOOL = "backfill"  # spool folder name under data_dir/spool/ when --config is given


def parse_time(text: str) -> int:
    """``now``, an integer of Unix nanoseconds, or ISO 8601 (UTC if no offset) -> Unix ns."""
    if text == "now":
        return time.time_ns()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"expected 'now', Unix nanoseconds or ISO 8601, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp()) * 10**9 + moment.microsecond * 1000


def iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _load(site_file: Path) -> Site:
    try:
        return load_site(site_file)
    except SiteFileError as exc:
        raise click.ClickException(str(exc)) from exc


def _secret(env: str | None, file: Path | None, what: str) -> str | None:
    if env is None and file is None:
        return None
    try:
        return SecretRef(env=env, file=file).read()
    except (FlowlineError, ValueError) as exc:
        raise click.ClickException(f"{what}: {exc}") from exc


def opcua_cert(cert_dir: Path, site: str) -> CertFiles:
    """The server certificate in ``cert_dir`` (opcua-server.pem/.key/.der); a new CA issues one if absent."""
    files = CertFiles(cert_dir / "opcua-server.pem", cert_dir / "opcua-server.key", cert_dir / "opcua-server.der")
    if files.cert.exists() and files.key.exists() and files.der.exists():
        return files
    click.echo(f"making a CA and an OPC UA server certificate in {cert_dir} (clients trust ca.pem)", err=True)
    return server_certificate(CertificateAuthority(cert_dir), site)


site_option = click.option(
    "--site", "site_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="Site file."
)
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Plant model seed.")
epoch_option = click.option(
    "--epoch",
    default="now",
    show_default=True,
    help="'Now' of the fault timeline (faults cross their limit 2-4.5 days after it): now, ISO 8601 or Unix ns.",
)


@click.group()
def sim() -> None:
    """Plant simulator: an OPC UA server and an MQTT publisher with realistic, partly degrading assets.

    \b
    Examples:
      flowline sim faults --site lab/flowline/lab/examples/north-field.yaml --seed 7
      flowline sim backfill --site lab/flowline/lab/examples/north-field.yaml --spool data/spool/backfill --days 14
      flowline sim run --site lab/flowline/lab/examples/north-field.yaml --opcua-port 4840 \\
          --mqtt-host 127.0.0.1 --mqtt-port 8883 --mqtt-tls-ca ca.pem --mqtt-user sim --mqtt-password-env PW
    """


@sim.command()
@site_option
@seed_option
@epoch_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def faults(site_file: Path | None, seed: int, epoch: str, as_json: bool) -> None:
    """Print the injected faults' ground truth (asset, tag, kind, start, alarm-limit crossing).

    \b
    Example:
      flowline sim faults --site lab/flowline/lab/examples/north-field.yaml --seed 7 --epoch 2026-11-25T20:00:00Z
    """
    if site_file is None:
        raise click.UsageError("give --site FILE")
    epoch_ns = parse_time(epoch)
    plant = Plant(_load(site_file), seed, epoch_ns)
    rows = [
        {
            "asset": f.asset,
            "tag": f.tag,
            "kind": str(f.kind),
            "start": iso(f.start_ns),
            "crossing": iso(f.crossing_ns),
            "start_ns": f.start_ns,
            "crossing_ns": f.crossing_ns,
            "hours_to_crossing": round((f.crossing_ns - epoch_ns) / 3.6e12, 2),
            "limit": f.limit,
        }
        for f in plant.faults
    ]
    if as_json:
        click.echo(json.dumps({"seed": seed, "epoch_ns": epoch_ns, "faults": rows}, indent=2))
        return
    table = Table(title=f"Injected faults, seed {seed}, epoch {iso(epoch_ns)}")
    for column in ("asset", "tag", "kind", "start", "crossing", "hours_to_crossing", "limit"):
        table.add_column(column.replace("_", " "))
    for row in rows:
        table.add_row(
            *(str(row[c]) for c in ("asset", "tag", "kind", "start", "crossing", "hours_to_crossing", "limit"))
        )
    Console(width=None if sys.stdout.isatty() else 160).print(table)


@sim.command(name="backfill")
@site_option
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help=f"Flowline config: site file, and spool data_dir/spool/{BACKFILL_SPOOL} unless --spool.",
)
@click.option(
    "--spool",
    "spool_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="OT spool folder to write into (not open by another writer).",
)
@click.option("--days", type=click.FloatRange(min=0, min_open=True), default=14.0, show_default=True)
@click.option(
    "--step",
    "step_s",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds between samples.",
)
@click.option("--end", default="now", show_default=True, help="Last timestamp: now, ISO 8601 or Unix ns.")
@seed_option
@epoch_option
def backfill_command(
    site_file: Path | None,
    config_file: Path | None,
    spool_dir: Path | None,
    days: float,
    step_s: float,
    end: str,
    seed: int,
    epoch: str,
) -> None:
    """Write DAYS of history (every tag, past timestamps, origin=backfill) into an OT spool.

    \b
    Examples:
      flowline sim backfill --site lab/flowline/lab/examples/north-field.yaml --spool /var/lib/flowline/spool/backfill
      flowline sim backfill --config flowline.yaml --days 14 --step 60 --seed 7
    """
    if config_file is not None:
        config = load_config(config_file)
        site_file = site_file or config.site_file
        spool_dir = spool_dir or config.spool_dir(BACKFILL_SPOOL)
    if site_file is None or spool_dir is None:
        raise click.UsageError("give --site FILE and --spool DIR (or --config FILE)")
    end_ns = parse_time(end)
    plant = Plant(_load(site_file), seed, parse_time(epoch) if epoch != "now" else end_ns)
    console = Console(stderr=True)
    with Progress(
        TextColumn("backfill"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    ) as bar:
        task = bar.add_task("points", total=None)
        try:
            result = backfill(
                plant,
                spool_dir,
                days,
                step_s,
                end_ns,
                progress=lambda n, total: bar.update(task, completed=n, total=total),
            )
        except (BackfillError, SpoolLockedError) as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(
        f"backfill: {result.points} points ({len(plant.site.iter_tags())} tags) from {iso(result.start_ns)} "
        f"to {iso(result.end_ns)} in {result.records} spool records -> {spool_dir}"
    )


@sim.command()
@site_option
@seed_option
@epoch_option
@click.option("--rate-hz", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--opcua-host", default="127.0.0.1", show_default=True)
@click.option(
    "--opcua-port",
    type=click.IntRange(min=0, max=65535),
    default=0,
    show_default=True,
    help="0: a free port (printed in the READY line).",
)
@click.option(
    "--opcua-security",
    "policies",
    type=click.Choice(sorted(POLICIES)),
    multiple=True,
    help="Endpoints (repeatable). Default: none, plus basic256sha256 when --cert-dir is given.",
)
@click.option(
    "--cert-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Server certificate folder (opcua-server.pem/.key/.der); a CA and certificate are made if empty.",
)
@click.option("--opcua-user", help="Require this username (anonymous refused).")
@click.option("--opcua-password-env", help="Environment variable holding the OPC UA user's password.")
@click.option("--opcua-password-file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--opcua-history-hours",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Past hours of values to put into the OPC UA history at start (for HistoryRead).",
)
@click.option("--mqtt-host", help="Broker host; without it no MQTT tags are published.")
@click.option("--mqtt-port", type=click.IntRange(min=1, max=65535), default=8883, show_default=True)
@click.option(
    "--mqtt-tls-ca",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="CA certificate of the broker (TLS on).",
)
@click.option("--mqtt-insecure-plain", is_flag=True, help="Allow MQTT without TLS (test brokers only).")
@click.option("--mqtt-user")
@click.option("--mqtt-password-env", help="Environment variable holding the MQTT password.")
@click.option("--mqtt-password-file", type=click.Path(path_type=Path, dir_okay=False))
def run(
    site_file: Path | None,
    seed: int,
    epoch: str,
    rate_hz: float,
    opcua_host: str,
    opcua_port: int,
    policies: tuple[str, ...],
    cert_dir: Path | None,
    opcua_user: str | None,
    opcua_password_env: str | None,
    opcua_password_file: Path | None,
    opcua_history_hours: float,
    mqtt_host: str | None,
    mqtt_port: int,
    mqtt_tls_ca: Path | None,
    mqtt_insecure_plain: bool,
    mqtt_user: str | None,
    mqtt_password_env: str | None,
    mqtt_password_file: Path | None,
) -> None:
    """Serve live values from the plant model until SIGTERM/SIGINT.

    Prints one line 'READY opcua=opc.tcp://HOST:PORT [mqtt=HOST:PORT]' once serving.

    \b
    Examples:
      flowline sim run --site lab/flowline/lab/examples/north-field.yaml --seed 7 --opcua-port 4840
      MQTT_PW=... flowline sim run --site north-field.yaml --cert-dir pki/ --mqtt-host 127.0.0.1 \\
          --mqtt-port 8883 --mqtt-tls-ca pki/ca.pem --mqtt-user sim --mqtt-password-env MQTT_PW
    """
    if site_file is None:
        raise click.UsageError("give --site FILE")
    site = _load(site_file)
    plant = Plant(site, seed, parse_time(epoch))
    policies = policies or (("none", "basic256sha256") if cert_dir else ("none",))
    cert = opcua_cert(cert_dir, site.site) if cert_dir is not None else None
    users = None
    if opcua_user is not None:
        password = _secret(opcua_password_env, opcua_password_file, "OPC UA password")
        if password is None:
            raise click.UsageError("--opcua-user needs --opcua-password-env or --opcua-password-file")
        users = {opcua_user: password}
    try:
        opcua = SimOpcUaServer(site, opcua_port, opcua_host, policies, cert, users)
    except OpcUaServerError as exc:
        raise click.ClickException(str(exc)) from exc
    mqtt = None
    if mqtt_host is not None:
        if mqtt_tls_ca is None and not mqtt_insecure_plain:
            raise click.UsageError("MQTT needs --mqtt-tls-ca (or --mqtt-insecure-plain for a test broker)")
        settings = MqttSettings(
            host=mqtt_host,
            port=mqtt_port,
            username=mqtt_user,
            password=_secret(mqtt_password_env, mqtt_password_file, "MQTT password"),
            tls_ca=mqtt_tls_ca,
            client_id=f"flowline-sim-{site.site}",
        )
        mqtt = MqttPublisher(site, settings)
    simulator = Simulator(plant, opcua, mqtt, rate_hz)

    def ready() -> None:
        line = f"READY opcua={opcua.url}"
        if mqtt is not None:
            line += f" mqtt={mqtt_host}:{mqtt_port}"
        click.echo(line)
        sys.stdout.flush()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await simulator.seed_opcua_history(opcua_history_hours)
        await simulator.run(stop, on_ready=ready)

    try:
        asyncio.run(main())
    except (OpcUaServerError, MqttPublishError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"stopped after {simulator.steps} steps", err=True)
