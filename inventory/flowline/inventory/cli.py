"""``flowline assets``: check the site file; discover what servers expose that the inventory lacks."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from flowline.core.cli import LazyCommand, LazyGroup
from flowline.inventory.loader import SiteFileError, load_site, site_warnings

# `discover` speaks OPC UA, so it lives with the collectors (OT); the inventory only names it.
_LAZY = {
    "discover": LazyCommand(
        "flowline.collectors.discover:discover",
        "Browse an OPC UA server; list variables the site file does not know and site tags the server lacks.",
        "flowline-plant-collectors",
        "OT",
    ),
}


@click.group(cls=LazyGroup, lazy=_LAZY)
def assets() -> None:
    """The asset inventory: validate the site file, discover unknown signals."""


@assets.command()
@click.argument("site_file", type=click.Path(path_type=Path))
def check(site_file: Path) -> None:
    """Validate SITE_FILE and print every problem with its key path (exit 1 if any), then warnings.

    Warnings (exit 0): assets or tags that no approved flow lets through the DMZ, and two tags mapped
    to the same source.

    \b
    Example:
      flowline assets check lab/flowline/lab/examples/north-field.yaml
    """
    try:
        site = load_site(site_file)
    except SiteFileError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    tags = site.iter_tags()
    by_source: dict[str, int] = {}
    for _, tag in tags:
        by_source[tag.source.kind] = by_source.get(tag.source.kind, 0) + 1
    sources = ", ".join(f"{n} {k}" for k, n in sorted(by_source.items()))
    for warning in site_warnings(site):
        click.echo(f"{site_file}: WARNING: {warning}", err=True)
    click.echo(
        f"{site_file}: OK: site {site.site}, {len(site.assets)} assets, {len(tags)} tags ({sources}), "
        f"{len(site.flows)} approved flows"
    )
