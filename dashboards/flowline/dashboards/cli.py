"""``flowline dashboards export|provision``."""

from __future__ import annotations

import time
from pathlib import Path

import click
from grafana_client.client import GrafanaClientError
from rich.console import Console

from flowline.core.config import FlowlineConfig, load_config
from flowline.core.errors import ConfigError
from flowline.core.secrets import SecretError, SecretRef
from flowline.dashboards.alerting import TEAMS, AlertingProvisioner, alert_rules, alerting_yaml
from flowline.dashboards.annotations import push_flag_changes, read_flag_changes
from flowline.dashboards.definitions import DEFAULT_HORIZON_HOURS, RELIABILITY_UID
from flowline.dashboards.export import PACKAGED_ALERTING, export, render_all
from flowline.dashboards.provision import (
    INFLUX_VERSIONS,
    GrafanaProvisioner,
    InfluxCredentials,
    ProvisionError,
    ProvisionReport,
    datasource_model,
    write_provisioning,
)
from flowline.historian.connection import Connection
from flowline.historian.errors import HistorianError
from flowline.historian.query import HistorianReader
from flowline.historian.tiers import duration_seconds
from flowline.inventory import Site, SiteFileError, load_site

console = Console(stderr=True)


def _site(path: Path | None) -> Site | None:
    if path is None:
        return None
    try:
        return load_site(path)
    except SiteFileError as exc:
        raise click.ClickException(str(exc)) from exc


def _config(path: Path | None) -> FlowlineConfig | None:
    if path is None:
        return None
    try:
        return load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _site_of(site_file: Path | None, config: FlowlineConfig | None) -> Site | None:
    """--site, else the config's site file; without either, say what the dashboards will lack."""
    site = _site(site_file or (config.site_file if config is not None else None))
    if site is None:
        console.print(
            "[yellow]No site file (--site or --config): the operations centre has no production panels and "
            "no alarm bands, and no alert rules are generated.[/yellow]"
        )
    return site


def _horizon(config: FlowlineConfig | None) -> float:
    return config.analytics.horizon_hours if config is not None else DEFAULT_HORIZON_HOURS


def write_alerting(out: Path, site: Site, config: FlowlineConfig | None) -> Path:
    """The alerting provisioning file for ``site`` in ``out``; returns its path."""
    rules = alert_rules(site, config.collectors.opcua if config else None, config.spool if config else None)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PACKAGED_ALERTING
    path.write_text(alerting_yaml(rules, site.site), encoding="utf-8")
    return path


def _secret(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return SecretRef(file=path).read()
    except SecretError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def dashboards() -> None:
    """Grafana dashboards as code: export the JSON, or provision a Grafana through its API."""


site_option = click.option(
    "--site",
    "site_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Site file: production streams, units and alarm-limit bands on the operations centre; the alert rules.",
)
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Flowline config: its site file, forecast horizon (reliability time range), OPC UA sampling and spool size.",
)


@dashboards.command("export")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option(
    "--provisioning-out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write the Grafana file-provisioning YAML (datasource variants, dashboard provider) here.",
)
@click.option(
    "--alerting-out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write the Grafana alerting provisioning file (rules, contact points, policy) here; needs a site.",
)
@site_option
@config_option
def export_command(
    out: Path,
    provisioning_out: Path | None,
    alerting_out: Path | None,
    site_file: Path | None,
    config_path: Path | None,
) -> None:
    """Write the four dashboards as Grafana JSON files (and, optionally, the alert rules).

    \b
    Examples:
      flowline dashboards export --out /var/lib/grafana/dashboards/flowline --config flowline.yaml
      flowline dashboards export --out dash/ --site north-field.yaml --alerting-out alerting/
    """
    config = _config(config_path)
    site = _site_of(site_file, config)
    if alerting_out is not None and site is None:
        raise click.BadParameter("alert rules are generated from a site file: give --site or --config")
    for path in export(out, site, _horizon(config)):
        click.echo(path)
    if provisioning_out is not None:
        for path in write_provisioning(provisioning_out):
            click.echo(path)
    if alerting_out is not None and site is not None:
        click.echo(write_alerting(alerting_out, site, config))


@dashboards.command("provision")
@click.option("--url", required=True, help="Grafana base URL, e.g. https://grafana.example:3000")
@click.option(
    "--token-file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding a Grafana service-account token (Editor on the folder, Admin to manage datasources).",
)
@click.option(
    "--datasource-url",
    help="InfluxDB URL as Grafana reaches it; creates or updates the Flowline datasource. "
    "Without it, the dashboards use Grafana's default InfluxDB datasource.",
)
@click.option("--influx-version", type=click.Choice(INFLUX_VERSIONS), default="2", show_default=True)
@click.option("--database", default="flowline", show_default=True, help="InfluxDB database (DBRP name on 2.x).")
@click.option("--influx-user", help="Read-only InfluxDB 1.x user for Grafana.")
@click.option("--influx-password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--influx-token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read-only InfluxDB 2.x/3.x token for Grafana.",
)
@click.option("--folder", default="Flowline", show_default=True, help="Grafana folder title.")
@click.option(
    "--push-annotations",
    is_flag=True,
    help="Also copy flag changes from InfluxDB (events) into Grafana annotations. Off by default: the "
    "dashboards read them with an InfluxQL annotation query. Reads with the --datasource-url credentials.",
)
@click.option("--since", default="7d", show_default=True, help="How far back --push-annotations looks (e.g. 12h, 30d).")
@click.option(
    "--alert-email",
    "alert_emails",
    multiple=True,
    metavar="TEAM=ADDRESSES",
    help=f"Also provision the alert rules, contact points and policy; one per team ({', '.join(TEAMS)}), "
    "comma-separated addresses. Needs --site or --config.",
)
@site_option
@config_option
def provision_command(
    url: str,
    token_file: Path,
    datasource_url: str | None,
    influx_version: str,
    database: str,
    influx_user: str | None,
    influx_password_file: Path | None,
    influx_token_file: Path | None,
    folder: str,
    push_annotations: bool,
    since: str,
    alert_emails: tuple[str, ...],
    site_file: Path | None,
    config_path: Path | None,
) -> None:
    """Create or update the Flowline folder, datasource and dashboards in a running Grafana.

    Idempotent: run it again after an upgrade and only what changed is written.

    \b
    Examples:
      flowline dashboards provision --url https://grafana:3000 --token-file /run/secrets/grafana_token
      flowline dashboards provision --url http://localhost:3000 --token-file tok \\
          --datasource-url http://influxdb:8086 --influx-version 1 \\
          --influx-user grafana --influx-password-file influx_ro_password
    """
    version = next(v for v in INFLUX_VERSIONS if v == influx_version)
    config = _config(config_path)
    site = _site_of(site_file, config)
    emails = _emails(alert_emails) if alert_emails else None
    if emails is not None and site is None:
        raise click.BadParameter("alert rules are generated from a site file: give --site or --config")
    datasource = None
    credentials = InfluxCredentials()
    if push_annotations and datasource_url is None:
        raise click.BadParameter("needs --datasource-url to read the flag changes", param_hint="--push-annotations")
    if datasource_url is not None:
        if version == "1" and influx_token_file is not None:
            raise click.BadParameter(
                "InfluxDB 1.x uses --influx-user/--influx-password-file", param_hint="--influx-token-file"
            )
        if version != "1" and influx_token_file is None:
            raise click.BadParameter(f"InfluxDB {version}.x needs a read token", param_hint="--influx-token-file")
        credentials = InfluxCredentials(
            user=influx_user, password=_secret(influx_password_file), token=_secret(influx_token_file)
        )
        datasource = datasource_model(version, datasource_url, database, credentials)
    token = _secret(token_file)
    assert token is not None
    provisioner = GrafanaProvisioner.connect(url, token)
    provisioner.folder_title = folder
    with console.status(f"provisioning {url} ..."):
        try:
            report = provisioner.run(list(render_all(site, _horizon(config)).values()), datasource)
            if emails is not None and site is not None:
                _provision_alerts(provisioner, site, config, emails, report)
        except ProvisionError as exc:
            raise click.ClickException(str(exc)) from exc
    for kind, name, action in report.actions:
        click.echo(f"{kind:<10} {action:<9} {name}")
    if push_annotations:
        assert datasource_url is not None
        _push_annotations(provisioner, datasource_url, database, credentials, since, site)


def _emails(values: tuple[str, ...]) -> dict[str, str]:
    emails: dict[str, str] = {}
    for text in values:
        team, _, addresses = text.partition("=")
        if team not in TEAMS or not addresses.strip():
            raise click.BadParameter(f"{text!r}: expected TEAM=ADDRESSES, TEAM one of {', '.join(TEAMS)}")
        emails[team] = addresses.strip()
    missing = [t for t in TEAMS if t not in emails]
    if missing:
        raise click.BadParameter(f"no address for {', '.join(missing)}", param_hint="--alert-email")
    return emails


def _provision_alerts(
    provisioner: GrafanaProvisioner,
    site: Site,
    config: FlowlineConfig | None,
    emails: dict[str, str],
    report: ProvisionReport,
) -> None:
    rules = alert_rules(site, config.collectors.opcua if config else None, config.spool if config else None)
    AlertingProvisioner(provisioner.api, provisioner.folder_uid).run(rules, site.site, emails, report)


def _push_annotations(
    provisioner: GrafanaProvisioner,
    url: str,
    database: str,
    credentials: InfluxCredentials,
    since: str,
    site: Site | None,
) -> None:
    try:
        seconds = duration_seconds(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from exc
    window_ns = (seconds if seconds is not None else int(time.time())) * 1_000_000_000
    conn = Connection(url, database, username=credentials.user, password=credentials.password, token=credentials.token)
    reader = HistorianReader(conn)
    try:
        changes = read_flag_changes(reader, time.time_ns() - window_ns, site.site if site else None)
        added, present = push_flag_changes(provisioner.api, changes, RELIABILITY_UID)
    except HistorianError as exc:
        raise click.ClickException(f"reading flag changes from {url}: {exc}") from exc
    except GrafanaClientError as exc:
        raise click.ClickException(f"Grafana refused an annotation: HTTP {exc.status_code}: {exc.message}") from exc
    finally:
        reader.close()
    click.echo(f"annotation added    {added} flag changes ({present} already in Grafana)")
