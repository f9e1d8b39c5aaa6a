"""``flowline relay``: placeholder until the relay lands."""

import click


@click.group()
def relay() -> None:
    """OT sender and DMZ gateway."""
