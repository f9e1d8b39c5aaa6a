"""The single entry point, ``flowline``. Each package contributes its own command group."""

from __future__ import annotations

import logging

import click

from flowline import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="flowline")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Flowline: telemetry from OT collectors through a one-way DMZ relay into InfluxDB,
    with predictive-maintenance analytics and Grafana dashboards.

    \b
    Examples:
      flowline demo --duration 120
      flowline assets check site.yaml
      flowline collect mqtt --config flowline.yaml
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register() -> None:
    # Imported here so that `flowline --help` lists every group; each module owns its commands.
    from flowline.analytics.cli import analyze, detect
    from flowline.collectors.cli import collect
    from flowline.dashboards.cli import dashboards
    from flowline.demo import demo
    from flowline.historian.cli import historian
    from flowline.inventory.cli import assets
    from flowline.relay.cli import relay
    from flowline.sim.cli import sim

    for command in (analyze, assets, collect, dashboards, demo, detect, historian, relay, sim):
        main.add_command(command)


_register()
