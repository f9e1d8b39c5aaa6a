"""``flowline dashboards``: placeholder until dashboards land."""

import click


@click.group()
def dashboards() -> None:
    """Grafana dashboards as code."""
