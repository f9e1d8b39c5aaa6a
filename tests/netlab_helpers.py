"""Shared by the network lab tests: a skip when the machine cannot build a lab, counted probe points."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flowline.core.points import TagRef, telemetry_point
from flowline.core.spool import SpoolWriter
from flowline.lab.labstack import PROBE_SPOOL, LabStack
from flowline.lab.netlab import NetLab
from flowline.lab.stack import StackOptions

# Skipped on a developer's machine without root; in CI (root, scripts/bootstrap) the tests must run.
needs_lab = pytest.mark.skipif(
    not os.environ.get("CI")
    and (os.geteuid() != 0 or not (shutil.which("nft") and shutil.which("ip") and shutil.which("ss"))),
    reason="the network lab needs root, iproute2 and nftables (CI runs as root; scripts/bootstrap installs them)",
)

PROBE = TagRef("north-field", "P-101", "vibration_rms", "mm/s")  # an approved flow of the demo site


def probe_range(index: int) -> tuple[int, int]:
    """A time range of its own per probe, in 2020, far from the simulator's live values."""
    start = 1_577_836_800_000_000_000 + index * 86_400_000_000_000
    return start, start + 86_400_000_000_000


def write_probe(stack: LabStack, index: int, count: int) -> None:
    """``count`` points of one probe range into the OT spool the sender drains, durable on return."""
    start, _ = probe_range(index)
    with SpoolWriter(stack.data_dir / "spool" / PROBE_SPOOL) as spool:
        for first in range(0, count, 5000):
            n = min(5000, count - first)
            spool.append_points([telemetry_point(PROBE, float(i), start + (first + i) * 1_000_000) for i in range(n)])


def probe_count(stack: LabStack, index: int) -> int:
    start, end = probe_range(index)
    rows = stack.query(
        f"SELECT count(value) FROM telemetry WHERE \"asset\" = '{PROBE.asset}' AND \"tag\" = '{PROBE.tag}'"
        f" AND time >= {start} AND time < {end}"
    )
    return int(rows[0]["count"]) if rows else 0


@contextmanager
def running_lab(workdir: Path, mode: str) -> Iterator[LabStack]:
    """A lab with the demo's site running in its zones; everything removed afterwards, also on failure."""
    net = NetLab("fltest", mode)  # type: ignore[arg-type]
    stack = LabStack(workdir, net, StackOptions(backfill_days=0))
    try:
        net.up()
        stack.start(backfill=False)
        yield stack
    finally:
        stack.stop()
        net.down()
