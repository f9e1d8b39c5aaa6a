"""``flowline analyze`` and ``flowline detect``: placeholder until analytics land."""

import click


@click.command()
def analyze() -> None:
    """Assess forecast tags."""


@click.command()
def detect() -> None:
    """Score a CSV."""
