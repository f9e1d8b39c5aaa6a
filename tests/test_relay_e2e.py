"""End to end with real processes: OT spool -> sender -> gateway -> DMZ spool -> writer -> InfluxDB."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flowline.core.spool import SpoolReader, SpoolWriter
from flowline.lab.pki import CertificateAuthority
from flowline.lab.services import InfluxDServer, wait_until
from flowline.relay.body import encode_body
from tests.relay_helpers import FLOWLINE, RelayRig, points, unacked_points


@pytest.fixture
def rig(tmp_path: Path, pki: CertificateAuthority, influx: InfluxDServer, influx_db: str) -> Iterator[RelayRig]:
    rig = RelayRig(tmp_path, pki, influx, influx_db)
    yield rig
    rig.stop_all()


def test_points_land_in_influxdb_exactly_once(rig: RelayRig) -> None:
    tap = rig.tap_writes()  # InfluxDB keeps one copy of a rewritten point: count at the writer
    with rig.ot_spool() as spool:
        for i in range(10):
            spool.append_points(points(5000, start_ns=1_700_000_000_000_000_000 + i * 5_000_000_000))
    rig.start_gateway()
    rig.start("writer", "--config", str(rig.dmz_path))
    rig.start("ot", "--config", str(rig.ot_path))
    try:
        wait_until(lambda: rig.count() == 50_000, 60, "50,000 points in InfluxDB")
        wait_until(
            lambda: rig.count("flowline_points_out_total", "WHERE stage='relay-ot'", "value") > 0,
            30,
            "the sender's own metrics to cross the relay",
        )
    except TimeoutError:
        print(rig.logs())
        raise
    assert rig.count() == 50_000
    wait_until(lambda: tap.ledger().unique == 50_000, 10, "the writer's ledger to show 50,000 points")
    ledger = tap.ledger()
    # Without a fault nothing may be written twice: the writer posted each point exactly once.
    assert (ledger.written, ledger.unique) == (50_000, 50_000), f"written {ledger.written}, unique {ledger.unique}"


def test_kill_9_of_gateway_sender_and_writer_loses_nothing(rig: RelayRig) -> None:
    rng = random.Random(99)
    tap = rig.tap_writes()
    procs = {
        "dmz": rig.start_gateway(),
        "writer": rig.start("writer", "--config", str(rig.dmz_path)),
        "ot": rig.start("ot", "--config", str(rig.ot_path)),
    }
    total = replayable = 0
    with rig.ot_spool() as spool:
        for round_ in range(6):
            for _ in range(4):
                spool.append_points(points(3000, start_ns=1_700_000_000_000_000_000 + total * 1_000_000))
                total += 3000
            time.sleep(rng.uniform(0.05, 0.6))  # let the pipeline get somewhere, then pull the plug
            victim = ("dmz", "ot", "writer")[round_ % 3]
            procs[victim].kill()
            # -9 proves the process was alive when the fault hit (not already gone by itself).
            assert procs[victim].wait() == -signal.SIGKILL, rig.logs()
            if victim == "writer":
                replayable += unacked_points(rig.dmz.spool_dir("dmz"), relay_bodies=True)
            elif victim == "dmz":  # killed between storing a batch and noting its sequence: stored twice
                replayable += unacked_points(rig.ot.spool_dir("opcua"), relay_bodies=False)
            procs[victim] = (
                rig.start_gateway()
                if victim == "dmz"
                else rig.start(victim, "--config", str(rig.dmz_path if victim == "writer" else rig.ot_path))
            )
    try:
        wait_until(lambda: rig.count() == total, 90, f"all {total} points in InfluxDB")
        wait_until(lambda: tap.ledger().unique == total, 10, f"the writer's ledger to show {total} points")
    except TimeoutError:
        print(rig.logs())
        raise
    ledger = tap.ledger()
    print(f"\nkill -9: {total} points, written {ledger.written}, duplicates {ledger.duplicates}")
    assert rig.count() == total
    # At least once: a killed writer rewrites only what it had not acknowledged in the DMZ spool; a
    # killed gateway at most the batch in flight (still unacknowledged in the OT spool); a killed
    # sender nothing (the gateway acknowledges a replayed sequence without storing it again).
    replayable += tap.unanswered_points  # InfluxDB took them, the killed writer never heard
    assert ledger.duplicates <= replayable, f"{ledger.duplicates} duplicates, at most {replayable} replayable"


def test_cli_help_and_bad_config(tmp_path: Path) -> None:
    for command in ("ot", "dmz", "writer", "diode-send", "diode-receive"):
        out = subprocess.run(
            [sys.executable, "-m", "flowline.relay", command, "--help"], capture_output=True, text=True, check=True
        )
        assert "Example" in out.stdout and "--config" in out.stdout
    (tmp_path / "bad.yaml").write_text("site_file: x.yaml\nrelay_ot: {sender_id: a}\n")
    bad = subprocess.run(
        [FLOWLINE, "relay", "ot", "--config", str(tmp_path / "bad.yaml")], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "relay_ot.gateway_host" in bad.stderr


def test_influxdb_outage_fills_the_dmz_spool_not_the_ot_one(
    tmp_path: Path, pki: CertificateAuthority, influx_factory: Callable[..., InfluxDServer]
) -> None:
    server = influx_factory()
    server.create_database("outage")
    rig = RelayRig(tmp_path, pki, server, "outage")
    try:
        rig.start_gateway()
        rig.start("writer", "--config", str(rig.dmz_path))
        rig.start("ot", "--config", str(rig.ot_path))
        with rig.ot_spool() as spool:
            spool.append_points(points(1000))
            wait_until(lambda: rig.count() == 1000, 60, "first points in InfluxDB")
            server.stop()
            spool.append_points(points(5000, start_ns=1_800_000_000_000_000_000))
            ot, dmz = SpoolReader(rig.ot.spool_dir("opcua")), SpoolReader(rig.dmz.spool_dir("dmz"))
            wait_until(lambda: ot.pending_bytes() == 0 and dmz.pending_bytes() > 0, 60,
                       "the OT spool to drain into the DMZ spool while InfluxDB is down")
            server.start()
            wait_until(lambda: rig.count() == 6000, 90, "the DMZ backlog to reach InfluxDB")
    except TimeoutError:
        print(rig.logs())
        raise
    finally:
        rig.stop_all()


def test_wrong_influxdb_password_stops_the_writer_with_a_clear_error(rig: RelayRig) -> None:
    (rig.root / "influx.pw").write_text("wrong-password")
    writer = rig.start("writer", "--config", str(rig.dmz_path))
    # The writer only talks to InfluxDB once there is something to write.
    with SpoolWriter(rig.dmz.spool_dir("dmz")) as dmz:
        dmz.append([encode_body(points(10))])
    assert writer.wait(60) != 0
    log = (rig.root / "writer-0.log").read_text()
    assert "relay writer" in log and ("401" in log or "auth" in log.lower()), log[-2000:]
    assert SpoolReader(rig.dmz.spool_dir("dmz")).pending_bytes() > 0  # the data stays spooled
