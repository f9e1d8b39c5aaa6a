"""``flowline demo``: placeholder until the orchestrator lands."""

import click


@click.command()
def demo() -> None:
    """Run the whole pipeline locally."""
