"""Diode mode over a truly one-way link in the network lab, with loss injected by the firewall.

The firewall's egress hook on its OT interface drops every frame towards OT, so the OT namespace
receives nothing at all (its interface counter stays at 0); loss on the forward direction comes
from ``numgen random mod 100 < N drop``. The whole demo pipeline runs, and counted probe points
must all land in InfluxDB at each loss level.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flowline.lab.labstack import LabStack
from flowline.lab.services import wait_until
from tests.netlab_helpers import needs_lab, probe_count, running_lab, write_probe

pytestmark = needs_lab

PROBE_POINTS = 50_000


@pytest.fixture(scope="module")
def diode_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabStack]:
    with running_lab(tmp_path_factory.mktemp("diode-lab"), "diode") as stack:
        yield stack


@pytest.mark.parametrize("loss_pct", [0, 1, 5])
def test_stream_is_complete_over_a_one_way_link(diode_lab: LabStack, loss_pct: int) -> None:
    net = diode_lab.lab
    net.set_loss(loss_pct)
    before = net.counters()
    write_probe(diode_lab, 10 + loss_pct, PROBE_POINTS)
    wait_until(
        lambda: probe_count(diode_lab, 10 + loss_pct) == PROBE_POINTS,
        120,
        f"{PROBE_POINTS} probe points through the diode at {loss_pct} % loss",
        interval=0.5,
    )
    after = net.counters()
    sent = after["diode_allowed"] - before["diode_allowed"]
    dropped = after["diode_loss_dropped"] - before["diode_loss_dropped"]
    print(
        f"loss {loss_pct} %: {sent} datagrams passed, {dropped} dropped by the loss rule;"
        f" reverse direction: {after['reverse_dropped']} frames dropped in total"
    )
    assert sent > 0
    if loss_pct == 0:
        assert dropped == 0
    else:
        assert dropped > 0  # the loss rule really dropped datagrams of this stream
    # Nothing ever reached OT, and there is no TCP path at all in diode mode.
    assert net.rx_packets("ot") == 0
    assert after["relay_allowed"] == 0 and after["into_ot_dropped"] == 0
    # The diode sender's socket is connected, not listening: OT still listens on loopback only.
    assert all(s.loopback for s in net.listeners("ot")), net.listeners("ot")
    lost = [line for line in diode_lab.stages["diode-receive"].log_tail(100_000).splitlines() if "lost batch" in line]
    assert lost == [], lost
