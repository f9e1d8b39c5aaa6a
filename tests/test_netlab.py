"""The network lab: real namespaces and nftables rules, the demo's site running in its zones.

One lab (module scope) runs the whole pipeline: OT (Mosquitto, simulator, collectors, sender), DMZ
(gateway, writer), IT (InfluxDB). The tests read what the kernel says: firewall counters, interface
counters, ``ss``.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from flowline.lab.labstack import LabStack
from flowline.lab.netlab import LabError, NetLab, address
from flowline.lab.services import wait_until
from tests.netlab_helpers import needs_lab, probe_count, running_lab, write_probe

pytestmark = needs_lab


def _namespaces() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def test_a_lab_that_fails_to_build_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    lab = NetLab("fltest")
    monkeypatch.setattr(lab, "ruleset", lambda: "table inet broken { chain x { nonsense } }\n")
    with pytest.raises(LabError, match="nft"):
        lab.up()
    assert not any(lab.exists().values())
    assert not set(lab.namespaces.values()) & _namespaces()


def test_two_labs_get_their_own_namespaces_and_both_go_away() -> None:
    with NetLab("fltest") as one, NetLab("fltest") as two:
        assert set(one.namespaces.values()).isdisjoint(two.namespaces.values())
        assert all(one.exists().values()) and all(two.exists().values())
    assert not (set(one.namespaces.values()) | set(two.namespaces.values())) & _namespaces()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabStack]:
    with running_lab(tmp_path_factory.mktemp("lab"), "tcp") as stack:
        yield stack


def test_data_flows_through_the_zones_on_the_approved_flows_only(lab: LabStack) -> None:
    rows = lab.wait_for(
        "SELECT count(value) FROM telemetry WHERE time > now() - 10m GROUP BY asset",
        lambda rows: len(rows) >= 10,
        120,
        "live telemetry of the OT collectors in IT's InfluxDB",
    )
    assert sum(int(r["count"]) for r in rows) > 0
    counters = lab.lab.counters()
    assert counters["relay_allowed"] >= 1  # the OT sender's connection to the gateway
    assert counters["historian_allowed"] >= 1  # the writer's connections to InfluxDB
    # Everything the pipeline needs is one of the two approved flows: nothing else was even tried.
    assert counters["ot_denied"] == counters["dmz_denied"] == counters["it_denied"] == 0, counters
    assert counters["into_ot_dropped"] == 0, counters


def _ot_addresses(lab: LabStack) -> list[str]:
    out = subprocess.run(
        ["ip", "-n", lab.lab.namespaces["ot"], "-j", "addr"], capture_output=True, text=True, check=True
    ).stdout
    found = [a["local"] for link in json.loads(out) for a in link.get("addr_info", [])]
    assert address("ot") in found and all(a == address("ot") or a.startswith("127.") for a in found), found
    return [a for a in found if not a.startswith("127.")]  # loopback is each namespace's own


def _tcp_answers(target: str) -> list[int]:
    """Ports of ``target`` that answer a SYN at all (SYN-ACK or RST), probing 1024 at a time."""
    answered = []
    for start in range(1, 65536, 1024):
        socks: dict[int, tuple[socket.socket, int]] = {}
        poller = select.poll()
        for port in range(start, min(start + 1024, 65536)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex((target, port))
            socks[sock.fileno()] = (sock, port)
            poller.register(sock, select.POLLOUT)
        time.sleep(0.05)  # an answer inside a lab takes microseconds
        answered += [socks[fd][1] for fd, _ in poller.poll(50)]
        for sock, _ in socks.values():
            sock.close()  # before the first SYN retransmission: each port is probed exactly once
    return answered


def _udp_sweep(target: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for port in range(1, 65536):
            sock.sendto(b"probe", (target, port))


def test_no_port_of_any_ot_address_is_reachable_from_dmz_or_it(lab: LabStack) -> None:
    net = lab.lab
    targets = _ot_addresses(lab)
    # A control: a listener on OT's own address, reachable from OT itself.
    control = net.run_in("ot", lambda: socket.create_server((address("ot"), 0)))
    port = control.getsockname()[1]
    try:
        net.run_in("ot", lambda: socket.create_connection((address("ot"), port), 2)).close()  # reachable in OT
        before = net.counters()["into_ot_dropped"]
        for zone in ("dmz", "it"):
            for target in targets:
                assert net.run_in(zone, partial(_tcp_answers, target)) == [], f"{zone} reached TCP ports of {target}"
                net.run_in(zone, partial(_udp_sweep, target))
            with pytest.raises(TimeoutError):
                net.run_in(zone, lambda: socket.create_connection((address("ot"), port), 2))
        dropped = net.counters()["into_ot_dropped"] - before
        # Every SYN and every datagram of both sweeps from both zones died at the firewall.
        assert dropped >= 2 * len(targets) * 2 * 65535, dropped
    finally:
        control.close()


def test_ot_listens_on_loopback_only(lab: LabStack) -> None:
    listeners = lab.lab.listeners("ot")
    # Mosquitto (TLS) and the simulator's OPC UA server listen, for OT's own collectors only.
    assert len([s for s in listeners if s.proto == "tcp"]) >= 2, listeners
    assert all(s.loopback for s in listeners), [s for s in listeners if not s.loopback]


def test_the_dmz_down_ot_spools_and_loses_nothing(lab: LabStack) -> None:
    gateway = lab.stages["relay-dmz"]
    gateway.stop()
    try:
        write_probe(lab, 1, 20_000)
        time.sleep(3)
        assert probe_count(lab, 1) == 0  # nothing passes while the DMZ is down
        spool = lab.data_dir / "spool" / "probe"
        assert sum(f.stat().st_size for f in spool.iterdir() if f.is_file()) > 0
    finally:
        gateway.start()
    wait_until(lambda: probe_count(lab, 1) == 20_000, 90, "the spooled probe points after the DMZ came back")
    time.sleep(2)
    assert probe_count(lab, 1) == 20_000  # exactly once


def test_lab_cli_up_status_down(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from flowline.lab.labstack import lab as lab_group

    runner = CliRunner()
    status = runner.invoke(lab_group, ["status", "--workdir", str(tmp_path)])
    assert status.exit_code == 1 and "no lab in" in status.output and "flowline lab up" in status.output
