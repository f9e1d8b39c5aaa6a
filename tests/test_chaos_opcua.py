"""Chaos on the OPC UA path: the server restarts and renumbers its nodes while the collector collects.

The collector knows its tags by browse path (the way to survive a PLC download). The simulator's
server is stopped under it again and again: half the restarts bring the same server back (its
history kept, like a server with its own historian), the others bring up a new address space in
which every node got another numeric id, with the ids of the tags swapped around, so a collector
that kept a stale node id would file one tag's values under another. Each value encodes its tick
and its tag (``tick * 100 + tag``), so a value under the wrong tag or from nowhere is caught.

Checked: every restart was seen (a new session each time, node ids re-resolved to the new ones);
every tick written while the collector was subscribed is in the spool for every tag, except those
written in the last moments before a server stop (the server's own loss: it died before it
published them, reported); no value sits under the wrong tag.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua

from flowline.collectors.opcua import OpcUaCollector
from flowline.inventory import load_site
from flowline.lab.sim.opcua_server import SimOpcUaServer
from tests.collectors_helpers import telemetry, write_config, write_site
from tests.test_collector_opcua import NONE, _opcua_section, _until

pytestmark = pytest.mark.slow

TAGS = 20
RESTARTS = int(os.environ.get("FLOWLINE_CHAOS_OPCUA_RESTARTS", "4"))
TICK_S = 0.2
# What a server stop may take with it: values not yet sampled and published (100 ms interval).
GRACE_S = 0.5


def value(tick: int, k: int) -> float:
    return float(tick * 100 + k)


def server_site(folder: Path, generation: int, renumbered: bool) -> Path:
    """The PLC's address space: string ids at first, then fresh numeric ids in a new order per download."""
    order = random.Random(generation).sample(range(TAGS), TAGS) if renumbered else list(range(TAGS))
    # The same id range each time in another order: a stale id points at another tag's node.
    nodes = [f"ns=2;i={100 + order[k]}" if renumbered else f"ns=2;s=U-1.t{k}" for k in range(TAGS)]
    tags: list[dict[str, Any]] = [{"name": f"t{k}", "source": {"opcua": {"node": nodes[k]}}} for k in range(TAGS)]
    return write_site(folder, tags, name=f"plc-{generation}.yaml")


def test_opcua_server_restarts_and_renumbering_while_collecting(tmp_path: Path) -> None:
    collector_site = write_site(
        tmp_path,
        [{"name": f"t{k}", "source": {"opcua": {"browse_path": f"0:Objects/2:test-site/2:U-1/2:t{k}"}}}
         for k in range(TAGS)],
    )
    asyncio.run(_chaos(tmp_path, collector_site))


async def _chaos(tmp_path: Path, collector_site: Path) -> None:
    server = SimOpcUaServer(load_site(server_site(tmp_path, 0, renumbered=False)))
    await server.start()
    config = write_config(tmp_path, collector_site, _opcua_section(server.url, NONE))
    collector = OpcUaCollector(config)
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    session = collector.sessions[0]
    # (tick, monotonic time its last value was written)
    written: list[tuple[int, float]] = []
    stops: list[float] = []
    kinds = {"restart": 0, "renumber": 0}
    tick = 0
    try:
        for cycle in range(RESTARTS + 1):
            def subscribed(n: int = cycle + 1) -> bool:
                return session.connected.is_set() and session.connections == n
            await _until(subscribed, 60, f"session {cycle + 1} to subscribe")
            # The collector follows the server's numbering: each tag resolved to this server's node.
            assert [t.node_id for t in session.tags] == [server.node_id("U-1", f"t{k}") for k in range(TAGS)]
            end = time.monotonic() + random.Random(cycle).uniform(1.5, 3.0)
            while time.monotonic() < end:
                tick += 1
                for k in range(TAGS):
                    await server.set_value("U-1", f"t{k}", value(tick, k))
                written.append((tick, time.monotonic()))
                await asyncio.sleep(TICK_S)
            if cycle == RESTARTS:
                break
            await server.stop()
            stops.append(time.monotonic())
            await _until(lambda: not session.connected.is_set(), 30, "the collector to notice the server is gone")
            if cycle % 2 == 0:
                kinds["renumber"] += 1
                port = server.port
                server = SimOpcUaServer(load_site(server_site(tmp_path, cycle + 1, renumbered=True)), port=port)
            else:
                kinds["restart"] += 1
            await server.start()
        await asyncio.sleep(1.0)  # the last ticks' publish
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await server.stop()

    seen: dict[int, set[int]] = {}  # tick -> tags that delivered it
    wrong: list[tuple[str, object]] = []
    duplicates = 0
    for p in telemetry(config.spool_dir("opcua")):
        v = p.fields.get("value")
        if v == 0.0:
            continue  # a fresh address space's initial value, before the first tick was written
        k = int(p.tags["tag"][1:])
        if not isinstance(v, float) or v % 1 or int(v) % 100 != k or not 1 <= int(v) // 100 <= tick:
            wrong.append((p.tags["tag"], v))
            continue
        tags = seen.setdefault(int(v) // 100, set())
        duplicates += k in tags
        tags.add(k)
    at_risk = {t for t, at in written if any(0 <= s - at <= GRACE_S for s in stops)}
    incomplete = [t for t, _ in written if len(seen.get(t, ())) < TAGS]
    lost_by_server = sum(TAGS - len(seen.get(t, ())) for t in incomplete if t in at_risk)
    print(
        f"\nchaos OPC UA: {kinds['restart']} restarts, {kinds['renumber']} renumbering restarts, sessions "
        f"{session.connections}; ticks {tick} x {TAGS} tags = {tick * TAGS} values written, found "
        f"{sum(len(s) for s in seen.values())}, lost with the server just before a stop {lost_by_server}, "
        f"lost otherwise {sum(TAGS - len(seen.get(t, ())) for t in incomplete if t not in at_risk)}, "
        f"repeated {duplicates}, wrong {len(wrong)}"
    )
    assert kinds["restart"] >= 1 and kinds["renumber"] >= 1 and session.connections == RESTARTS + 1
    assert not wrong, f"{len(wrong)} values under the wrong tag or not written, e.g. {wrong[:5]}"
    lost = [t for t in incomplete if t not in at_risk]
    missing = [sorted(set(range(TAGS)) - seen.get(t, set())) for t in lost[:3]]
    assert not lost, f"{len(lost)} ticks incomplete, e.g. {lost[:10]}: tags missing {missing}"
    assert all(isinstance(t.node_id, ua.NodeId) for t in session.tags)
