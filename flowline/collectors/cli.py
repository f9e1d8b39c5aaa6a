"""``flowline collect``: placeholder until the collectors land."""

import click


@click.group()
def collect() -> None:
    """OT collectors (OPC UA, MQTT)."""
