"""``flowline sim``: placeholder until the simulator lands."""

import click


@click.group()
def sim() -> None:
    """Plant simulator."""
