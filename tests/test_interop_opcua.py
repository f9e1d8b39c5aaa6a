"""Issue 16, OPC UA side (asyncua's server): bad status counted, tag types, discover, what the log says."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from asyncua import ua

from flowline.collectors.opcua import OpcUaCollector
from flowline.core.points import Quality
from flowline.inventory import load_site
from flowline.lab.pki import CertificateAuthority
from flowline.lab.sim.opcua_server import SimOpcUaServer, server_certificate
from tests.collectors_helpers import write_config, write_site
from tests.test_collector_opcua import NONE, SIM_TAGS, _opcua_section, _run, _until, _values

FLOWLINE = str(Path(sys.executable).parent / "flowline")
TYPED_TAGS: list[dict[str, Any]] = [
    {"name": "label", "source": {"opcua": {"node": "ns=2;s=U-1.label"}}},  # number (the default), gets text
    {"name": "mode", "type": "string", "source": {"opcua": {"node": "ns=2;s=U-1.mode"}}},  # gets a number
    {"name": "run", "type": "boolean", "source": {"opcua": {"node": "ns=2;s=U-1.run"}}},
]


def test_bad_status_values_are_stored_and_counted_not_rejected(tmp_path: Path) -> None:
    site_file = write_site(tmp_path, SIM_TAGS)
    server = SimOpcUaServer(load_site(site_file))

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        await _until(collector.sessions[0].connected.is_set, 15, "connected")
        await server.set_value("U-1", "t1", 4.0, status=0x808A0000)  # BadSensorFailure
        await server.set_value("U-1", "t1", 5.0)
        await _until(lambda: any(p.fields.get("value") == 5.0 for p in _values(spool, "t1")), 10, "good value")
        bad = next(p for p in _values(spool, "t1") if p.fields.get("status") == 0x808A0000)
        assert bad.fields["quality"] == Quality.BAD
        assert collector.metrics.counter("bad_status_total", server="default") == 1
        assert collector.metrics.total("rejected_total") == 0

    asyncio.run(_run(tmp_path, server, lambda url: write_config(tmp_path, site_file, _opcua_section(url, NONE)), body))


def test_values_of_the_wrong_type_for_their_tag_are_refused_and_counted(tmp_path: Path) -> None:
    site_file = write_site(tmp_path, SIM_TAGS + TYPED_TAGS)
    server = SimOpcUaServer(load_site(write_site(tmp_path, SIM_TAGS, name="sim-site.yaml")))

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        await server.add_variable("U-1", "label", "high", ua.VariantType.String)
        await server.add_variable("U-1", "mode", 3.0)
        await server.add_variable("U-1", "run", True, ua.VariantType.Boolean)
        await _until(lambda: bool(_values(spool, "run")), 15, "the boolean tag")
        await _until(lambda: collector.metrics.counter("rejected_total", reason="wrong_type") == 2, 10, "2 refusals")
        assert _values(spool, "label") == [] and _values(spool, "mode") == []
        assert _values(spool, "run")[0].fields["value"] == 1.0
        dead = collector.runtime.rejects.dead_letter.path.read_text()
        assert "U-1/label is a number tag but got a string ('high')" in dead
        assert "U-1/mode is a string tag but got a number (3.0)" in dead

    asyncio.run(_run(tmp_path, server, lambda url: write_config(tmp_path, site_file, _opcua_section(url, NONE)), body))


def test_discover_lists_signals_not_their_properties(tmp_path: Path) -> None:
    site_file = write_site(tmp_path, SIM_TAGS)
    server = SimOpcUaServer(load_site(site_file))

    async def main() -> Any:
        await server.start()
        try:
            assert server._server is not None
            node_id = await server.add_variable("U-1", "level", 1.0)
            variable = server._server.get_node(node_id)  # an analog item: EURange and EngineeringUnits
            await variable.add_property(
                ua.NodeId.from_string("ns=2;s=U-1.level.EURange"),
                ua.QualifiedName("EURange", 0),
                ua.Range(Low=0.0, High=5.0),
            )
            units = ua.EUInformation(DisplayName=ua.LocalizedText("m"), UnitId=5067859)
            await variable.add_property(
                ua.NodeId.from_string("ns=2;s=U-1.level.EU"), ua.QualifiedName("EngineeringUnits", 0), units
            )
            proc = await asyncio.create_subprocess_exec(
                FLOWLINE, "assets", "discover", "--opcua", server.url, "--site", str(site_file), "--insecure", "--json",
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await proc.communicate()
        finally:
            await server.stop()
        return json.loads(out)

    report = asyncio.run(main())
    assert [v["browse_path"] for v in report["unknown"]] == ["0:Objects/2:test-site/2:U-1/2:level"]
    assert report["variables"] == 3  # t1, t2, level


async def _collector_log(config_file: Path, until: str, then: float, server: SimOpcUaServer | None = None) -> str:
    """stderr of `flowline collect opcua` at default verbosity: read until a line holds ``until``, then
    stop ``server`` (when given) and read ``then`` seconds more."""
    proc = await asyncio.create_subprocess_exec(
        FLOWLINE, "collect", "opcua", "--config", str(config_file), stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []

    async def read(stop_at: str | None) -> None:
        assert proc.stderr is not None
        while line := (await proc.stderr.readline()).decode():
            lines.append(line)
            if stop_at is not None and stop_at in line:
                return

    try:
        await asyncio.wait_for(read(until), 30)
        if server is not None:
            await server.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read(None), then)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(proc.communicate(), 30)
    return "".join(lines) + rest.decode()


def test_collector_logs_connect_and_loss_in_one_line_each_at_default_verbosity(tmp_path: Path) -> None:
    site_file = write_site(tmp_path, SIM_TAGS)
    server = SimOpcUaServer(load_site(site_file))

    async def main() -> str:
        await server.start()
        write_config(tmp_path, site_file, _opcua_section(server.url, NONE))
        return await _collector_log(tmp_path / "flowline.yaml", "monitored items", 4, server)

    err = asyncio.run(main())
    assert "connected to OPC UA server default (opc.tcp://" in err and "security None/None): 2 monitored items" in err
    assert err.count("lost; reconnecting") == 1
    assert err.count("unavailable: ConnectionRefusedError") == 1  # not once per retry
    assert "retrying with back-off (0.2 to 1 s)" in err
    assert "Traceback" not in err and "Publish iteration crashed" not in err and "session timeout" not in err


def test_security_mismatch_is_a_configuration_error_naming_the_setting(tmp_path: Path) -> None:
    site_file = write_site(tmp_path, SIM_TAGS)
    site = load_site(site_file)
    ca = CertificateAuthority(tmp_path / "ca")
    server = SimOpcUaServer(site, policies=("basic256sha256",), cert=server_certificate(ca, site.site))

    async def main() -> str:
        await server.start()
        try:
            write_config(tmp_path, site_file, _opcua_section(server.url, NONE))
            return await _collector_log(tmp_path / "flowline.yaml", "configuration error", 3)
        finally:
            await server.stop()

    err = asyncio.run(main())
    lines = [line for line in err.splitlines() if "configuration error" in line]
    assert lines and all("ERROR" in line for line in lines)
    assert "does not accept security policy None with mode None" in lines[0]
    assert "it offers Basic256Sha256/Sign, Basic256Sha256/SignAndEncrypt" in lines[0]
    assert "collectors.opcua.servers.default.security.policy and .mode" in lines[0]
    assert "Traceback" not in err and "WARNING" not in err
    assert len(lines) == 1  # the retries that fail the same way are not logged again


def test_refused_client_certificate_is_one_line_without_asyncua_tracebacks(tmp_path: Path) -> None:
    site_file = write_site(tmp_path, SIM_TAGS)
    site = load_site(site_file)
    ca, other = CertificateAuthority(tmp_path / "ca"), CertificateAuthority(tmp_path / "other")
    cert = ca.issue("flowline-collector", stem="opcua-client", uri="urn:flowline:collector")
    server = SimOpcUaServer(
        site, policies=("basic256sha256",), cert=server_certificate(ca, site.site), trusted=(other.files.cert,)
    )
    security = {
        "policy": "Basic256Sha256", "mode": "SignAndEncrypt", "cert_file": str(cert.cert), "key_file": str(cert.key),
        "trusted_server_certs": [str(ca.files.cert)],
    }  # fmt: skip

    async def main() -> str:
        await server.start()
        try:
            write_config(tmp_path, site_file, _opcua_section(server.url, security))
            return await _collector_log(tmp_path / "flowline.yaml", "does not trust our client certificate", 3)
        finally:
            await server.stop()

    err = asyncio.run(main())
    assert err.count("does not trust our client certificate") == 1
    assert "Traceback" not in err and "asyncua" not in err
