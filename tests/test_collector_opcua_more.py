"""OPC UA collector: polling, deadbands, browse paths after renumbering, Aes128 policy, hung servers."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua

from flowline.collectors.opcua import OpcUaCollector
from flowline.core.config import FlowlineConfig
from flowline.inventory import load_site
from flowline.lab.pki import CertificateAuthority
from flowline.lab.sim.opcua_server import SimOpcUaServer, server_certificate
from tests.collectors_helpers import write_config, write_site
from tests.test_collector_opcua import NONE, _opcua_section, _run, _secure, _until, _values


def _tag(name: str, **opcua: Any) -> dict[str, Any]:
    return {"name": name, "source": {"opcua": {"node": f"ns=2;s=U-1.{name}", **opcua}}}


def _seen(spool: Path, tag: str) -> list[Any]:
    return [p.fields.get("value") for p in _values(spool, tag)]


def _server_filters(server: SimOpcUaServer) -> dict[str, Any]:
    """What the collector asked the server to monitor (node id string -> the item's filter), server side."""
    assert server._server is not None
    subscriptions = server._server.iserver.subscription_service.subscriptions.values()
    return {
        item.read_value_id.NodeId.to_string(): item.filter
        for sub in subscriptions
        for item in sub.monitored_item_srv._monitored_items.values()
        if item.read_value_id is not None
    }


def test_polled_tags_deliver_good_and_bad_values_without_a_monitored_item(tmp_path: Path) -> None:
    polled = [_tag("polled", poll=True, sampling_ms=100), _tag("gone", poll=True, sampling_ms=100)]
    site_file = write_site(tmp_path, [*polled, _tag("subscribed")])
    server = SimOpcUaServer(load_site(write_site(tmp_path, [polled[0], _tag("subscribed")], name="sim-site.yaml")))

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        await _until(collector.sessions[0].connected.is_set, 15, "connected")
        await server.set_value("U-1", "polled", 4.5)
        await _until(lambda: 4.5 in _seen(spool, "polled"), 10, "polled value")
        # a bad value is stored with its status, and polling goes on after it
        await server.set_value("U-1", "polled", 0.0, status=0x80000000)
        await _until(lambda: any(p.fields.get("status") == 0x80000000 for p in _values(spool, "polled")), 10, "bad")
        await server.set_value("U-1", "polled", 5.5)
        await _until(lambda: 5.5 in _seen(spool, "polled"), 10, "polled value after the bad one")
        assert list(_server_filters(server)) == ["ns=2;s=U-1.subscribed"]  # polled: no monitored item
        # a polled node the server lacks is rejected once; it does not stop the others
        assert collector.metrics.counter("rejected_total", reason="unknown_node") == 1
        assert "U-1/gone" in collector.runtime.rejects.dead_letter.path.read_text()
        assert _values(spool, "gone") == []

    asyncio.run(_run(tmp_path, server, lambda url: write_config(tmp_path, site_file, _opcua_section(url, NONE)), body))


def test_deadbands_are_requested_and_absolute_deadband_filters_small_changes(tmp_path: Path) -> None:
    site_file = write_site(tmp_path, [_tag("abs", deadband_abs=1.0), _tag("pct", deadband_pct=10.0), _tag("plain")])
    server = SimOpcUaServer(load_site(site_file))

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        await _until(collector.sessions[0].connected.is_set, 15, "connected")
        filters = _server_filters(server)
        # no filter requested (server-side filter objects are not ua.DataChangeFilter: look at the attribute)
        assert getattr(filters["ns=2;s=U-1.plain"], "DeadbandType", None) is None
        absolute, percent = filters["ns=2;s=U-1.abs"], filters["ns=2;s=U-1.pct"]
        assert (absolute.DeadbandType, absolute.DeadbandValue) == (ua.DeadbandType.Absolute, 1.0)
        assert (percent.DeadbandType, percent.DeadbandValue) == (ua.DeadbandType.Percent, 10.0)
        assert absolute.Trigger == percent.Trigger == ua.DataChangeTrigger.StatusValue
        # asyncua's server evaluates absolute deadbands only (percent needs EURange; it passes every change)
        for value in (0.5, 2.5, 2.8, 10.0):
            await server.set_value("U-1", "abs", value)
        await _until(lambda: 10.0 in _seen(spool, "abs"), 10, "the change past the deadband")
        seen = _seen(spool, "abs")
        assert 2.5 in seen and 0.5 not in seen and 2.8 not in seen, seen

    asyncio.run(_run(tmp_path, server, lambda url: write_config(tmp_path, site_file, _opcua_section(url, NONE)), body))


def test_browse_path_tag_survives_a_renumbering_server_restart(tmp_path: Path) -> None:
    by_path = {"name": "b1", "source": {"opcua": {"browse_path": "0:Objects/2:test-site/2:U-1/2:b1"}}}
    site_file = write_site(tmp_path, [by_path])
    before = SimOpcUaServer(load_site(write_site(tmp_path, [_tag("b1")], name="plc-before.yaml")))
    after_site = load_site(
        write_site(tmp_path, [{"name": "b1", "source": {"opcua": {"node": "ns=2;i=7001"}}}], name="plc-after.yaml")
    )
    after: SimOpcUaServer | None = None

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        nonlocal after
        session = collector.sessions[0]
        await _until(session.connected.is_set, 15, "connected")
        await before.set_value("U-1", "b1", 1.25)
        await _until(lambda: 1.25 in _seen(spool, "b1"), 10, "value before the PLC download")
        assert session.tags[0].node_id == ua.NodeId.from_string("ns=2;s=U-1.b1")
        await before.stop()
        await _until(lambda: not session.connected.is_set(), 15, "session loss detected")
        after = SimOpcUaServer(after_site, port=before.port)  # same endpoint, node renumbered
        await after.start()
        await _until(lambda: session.connections >= 2 and session.connected.is_set(), 30, "reconnected")
        assert session.tags[0].node_id == ua.NodeId.from_string("ns=2;i=7001")
        await after.set_value("U-1", "b1", 2.5)
        await _until(lambda: 2.5 in _seen(spool, "b1"), 10, "value from the renumbered node")

    async def main() -> None:
        try:
            await _run(tmp_path, before, lambda url: write_config(tmp_path, site_file, _opcua_section(url, NONE)), body)
        finally:
            if after is not None:
                await after.stop()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["Sign", "SignAndEncrypt"])
def test_aes128_sha256_rsaoaep_policy(tmp_path: Path, pki: CertificateAuthority, mode: str) -> None:
    site_file = write_site(tmp_path, [_tag("t1")])
    sim_site = load_site(site_file)
    server = SimOpcUaServer(
        sim_site, policies=("aes128sha256rsaoaep",), cert=server_certificate(pki, sim_site.site),
        trusted=(pki.files.cert,),
    )  # fmt: skip
    client_cert = pki.issue("flowline-collector", stem=f"opcua-aes128-{mode}", uri="urn:flowline:collector")
    security = _secure(client_cert, pki.files.cert, "Aes128_Sha256_RsaOaep", mode)

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        await _until(collector.sessions[0].connected.is_set, 20, "secure session")
        await server.set_value("U-1", "t1", 6.75)
        await _until(lambda: 6.75 in _seen(spool, "t1"), 10, "value over Aes128_Sha256_RsaOaep")
        assert collector.sessions[0].last_error is None

    def config(url: str) -> FlowlineConfig:
        return write_config(tmp_path, site_file, _opcua_section(url, security))

    asyncio.run(_run(tmp_path, server, config, body))


# A simulator server in its own process (so it can be frozen with SIGSTOP), writing t1 = 1, 2, 3, ...
_SERVER_PROCESS = """
import asyncio, sys
from flowline.inventory import load_site
from flowline.lab.sim.opcua_server import SimOpcUaServer

async def main() -> None:
    server = SimOpcUaServer(load_site(sys.argv[1]))
    await server.start()
    print(server.url, flush=True)
    count = 0
    while True:
        count += 1
        await server.set_value("U-1", "t1", float(count))
        await asyncio.sleep(0.1)

asyncio.run(main())
"""


def test_hung_server_is_detected_by_keepalive_and_collection_resumes(tmp_path: Path) -> None:
    site_file = write_site(tmp_path, [_tag("t1")])
    proc = subprocess.Popen([sys.executable, "-c", _SERVER_PROCESS, str(site_file)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().strip()
        assert url.startswith("opc.tcp://"), url
        config = write_config(tmp_path, site_file, _opcua_section(url, NONE, keepalive_timeout_s=2))
        asyncio.run(_hang_and_resume(OpcUaCollector(config), proc))
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait(15)


async def _hang_and_resume(collector: OpcUaCollector, server: subprocess.Popen[bytes]) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    session = collector.sessions[0]
    spool = collector.runtime.writer.folder
    try:
        await _until(lambda: bool(_seen(spool, "t1")), 20, "values from the server process")
        assert collector.metrics.gauge("connected", target=session.target) == 1
        reconnects = collector.metrics.counter("reconnects_total", target=session.target)
        server.send_signal(signal.SIGSTOP)  # the TCP connection stays open, the server stops answering
        await _until(lambda: not session.connected.is_set(), 30, "keep-alive noticing the hung server")
        assert collector.metrics.gauge("connected", target=session.target) == 0
        frozen_at = max(_seen(spool, "t1"))
        server.send_signal(signal.SIGCONT)
        await _until(
            lambda: collector.metrics.counter("reconnects_total", target=session.target) > reconnects,
            60, "reconnect after SIGCONT",
        )  # fmt: skip
        await _until(lambda: max(_seen(spool, "t1")) > frozen_at + 1, 30, "live values after the hang")
        assert collector.metrics.gauge("connected", target=session.target) == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
