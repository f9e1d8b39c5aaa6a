"""Shared by the network lab tests: a skip when the machine cannot build a lab, counted probe points."""

from __future__ import annotations

import os
import shutil
import time
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


DAY_NS = 86_400_000_000_000
# Probe days start 40 days back (UTC midnight, fixed for the whole test run): far from the simulator's
# live values, yet inside the raw retention policy (historian.raw_retention, 90 days by default) that
# the lab's InfluxDB set-up (setup_v1) makes the default. Older points would be dropped by InfluxDB
# ("points beyond retention policy") and dead-lettered by the writer, as at a site.
PROBE_EPOCH_NS = (time.time_ns() // DAY_NS - 40) * DAY_NS


def probe_range(index: int) -> tuple[int, int]:
    """A day of its own per probe (index 0 to 30), weeks before the simulator's live values."""
    assert 0 <= index <= 30, index
    start = PROBE_EPOCH_NS + index * DAY_NS
    return start, start + DAY_NS


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
