"""OPC UA collector against the simulator's asyncua server: security, restart, backfill, data types."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua

from flowline.collectors.opcua import OpcUaCollector, ServerSession
from flowline.collectors.opcua_security import OpcUaSecurityError
from flowline.core.config import FlowlineConfig
from flowline.core.points import Point, Quality
from flowline.core.spool import SpoolReader
from flowline.inventory import load_site
from flowline.lab.pki import CertificateAuthority
from flowline.lab.sim.opcua_server import SimOpcUaServer, server_certificate
from tests.collectors_helpers import telemetry, write_config, write_site

SIM_TAGS: list[dict[str, Any]] = [
    {"name": "t1", "unit": "degC", "source": {"opcua": {"node": "ns=2;s=U-1.t1"}}},
    {"name": "t2", "source": {"opcua": {"browse_path": "0:Objects/2:test-site/2:U-1/2:t2"}}},
]
# Tags the collector knows but the simulator's site file does not: added with add_variable per test.
EXTRA_TAGS: list[dict[str, Any]] = [
    {"name": n, "source": {"opcua": {"node": f"ns=2;s=U-1.{n}"}}} | ({"type": "string"} if n == "text" else {})
    for n in ("flag", "count", "text", "when", "arr", "missing")
]


async def _until(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


def _opcua_section(url: str, security: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "opcua": {
            "servers": {"default": {"url": url, "security": security, **extra.pop("endpoint", {})}},
            "publishing_interval_ms": 100,
            "sampling_interval_ms": 50,
            "keepalive_timeout_s": 2,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1,
            **extra,
        }
    }


NONE = {"policy": "None", "mode": "None"}


def _secure(
    client_cert: Any, trusted: Path, policy: str = "Basic256Sha256", mode: str = "SignAndEncrypt"
) -> dict[str, Any]:
    return {
        "policy": policy,
        "mode": mode,
        "cert_file": str(client_cert.cert),
        "key_file": str(client_cert.key),
        "trusted_server_certs": [str(trusted)],
    }


def _values(spool: Path, tag: str, **tags: str) -> list[Point]:
    return [p for p in telemetry(spool) if p.tags["tag"] == tag and all(p.tags.get(k) == v for k, v in tags.items())]


async def _run(
    tmp_path: Path,
    server: SimOpcUaServer,
    make_config: Callable[[str], FlowlineConfig],
    body: Callable[[OpcUaCollector, Path], Awaitable[None]],
) -> None:
    await server.start()
    collector = OpcUaCollector(make_config(server.url))
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    try:
        await body(collector, collector.runtime.writer.folder)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await server.stop()


def _assert_gap_closed_once(spool: Path, outage_from_ns: int) -> None:
    """7.0 was written only while the server was down; 8.0 then, and 9.0 after: each stored once."""
    after = [(p.fields["value"], p.tags.get("origin")) for p in _values(spool, "t1") if p.timestamp_ns > outage_from_ns]
    assert sorted(v for v, _ in after) == [7.0, 8.0, 9.0], after
    assert (7.0, "backfill") in after and (9.0, None) in after


def test_values_types_restart_and_backfill_without_security(tmp_path: Path) -> None:
    site_file = write_site(tmp_path, SIM_TAGS + EXTRA_TAGS)
    sim_site = load_site(write_site(tmp_path, SIM_TAGS, name="sim-site.yaml"))
    server = SimOpcUaServer(sim_site)

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        session = collector.sessions[0]
        await _until(session.connected.is_set, 15, "connected")
        ts = (time.time_ns() - 5_000_000_000) // 1000 * 1000  # datetime resolution: microseconds
        await server.set_value("U-1", "t1", 1.5, source_ts=ts)
        await server.set_value("U-1", "t2", 2.5, status=0x40000000)
        await _until(lambda: any(p.fields.get("value") == 1.5 for p in _values(spool, "t1")), 10, "t1")
        await _until(lambda: any(p.fields.get("value") == 2.5 for p in _values(spool, "t2")), 10, "t2 by path")
        t1 = next(p for p in _values(spool, "t1") if p.fields.get("value") == 1.5)
        assert t1.timestamp_ns == ts  # the source timestamp by default
        assert t1.tags["unit"] == "degC" and t1.tags["site"] == "test-site" and t1.tags["asset"] == "U-1"
        t2 = next(p for p in _values(spool, "t2") if p.fields.get("value") == 2.5)
        assert t2.fields["quality"] == Quality.UNCERTAIN and t2.fields["status"] == 0x40000000
        assert collector.metrics.counter("rejected_total", reason="unknown_node") >= 1  # flag... not yet there

        # restart mid-stream: values written while down come back by HistoryRead, later ones live
        await server.stop()
        await _until(lambda: not session.connected.is_set(), 15, "session loss detected")
        # Sampled after everything the collector spooled (a server's shutdown notice can carry a
        # timestamp of its own), so both lie in the gap that the backfill must close.
        now = time.time_ns()
        await server.set_value("U-1", "t1", 7.0, source_ts=now + 1_000_000)
        await server.set_value("U-1", "t1", 8.0, source_ts=now + 2_000_000)
        await server.add_variable("U-1", "flag", True, ua.VariantType.Boolean)
        await server.add_variable("U-1", "count", -42, ua.VariantType.Int16)
        await server.add_variable("U-1", "text", 'RUN, mode="auto"', ua.VariantType.String)
        await server.add_variable("U-1", "when", dt.datetime(2026, 1, 1, tzinfo=dt.UTC), ua.VariantType.DateTime)
        await server.add_variable("U-1", "arr", [1.0, 2.0, 3.0], ua.VariantType.Double)
        await server.start()
        await _until(lambda: session.connections >= 2, 30, "reconnected")
        await server.set_value("U-1", "t1", 9.0)
        await _until(lambda: any(p.fields.get("value") == 9.0 for p in _values(spool, "t1")), 15, "live after restart")
        await _until(lambda: len(_values(spool, "t1", origin="backfill")) >= 1, 15, "backfill")
        _assert_gap_closed_once(spool, now)
        assert collector.metrics.counter("reconnects_total", target=session.target) >= 1
        await _until(lambda: len(_values(spool, "arr")) == 3, 10, "array flattened")
        assert {(p.tags["index"], p.fields["value"]) for p in _values(spool, "arr")} == {
            ("0", 1.0),
            ("1", 2.0),
            ("2", 3.0),
        }
        assert _values(spool, "flag")[0].fields["value"] == 1.0
        assert _values(spool, "count")[0].fields["value"] == -42.0
        assert _values(spool, "text")[0].fields["value_str"] == 'RUN, mode="auto"'
        assert _values(spool, "when")[0].fields["value"] == dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp()
        # bad values are stored with their status; NaN is kept as a bad-quality marker
        await server.set_value("U-1", "t1", float("nan"))
        await server.set_value("U-1", "t2", 0.0, status=0x80000000)
        await _until(lambda: any(p.fields.get("value_str") == "nan" for p in _values(spool, "t1")), 10, "nan")
        await _until(lambda: any(p.fields.get("status") == 0x80000000 for p in _values(spool, "t2")), 10, "bad")
        # a source timestamp far outside the window is rejected, the stream goes on
        await server.set_value("U-1", "t1", 5.0, source_ts=dt.datetime(2001, 1, 1, tzinfo=dt.UTC))
        await server.set_value("U-1", "t1", 6.0)
        await _until(lambda: any(p.fields.get("value") == 6.0 for p in _values(spool, "t1")), 10, "after bad ts")
        assert collector.metrics.counter("rejected_total", reason="timestamp_out_of_window") == 1
        assert not any(p.fields.get("value") == 5.0 for p in _values(spool, "t1"))

    asyncio.run(_run(tmp_path, server, lambda url: write_config(tmp_path, site_file, _opcua_section(url, NONE)), body))


def test_backfill_racing_the_first_live_value_stores_each_sample_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a loaded host the server's first notification after a reconnect can come after the
    backfill read, or during it: either way the sample both return is stored once."""

    async def no_wait(self: ServerSession, tags: list[Any]) -> None:
        return None

    monkeypatch.setattr(ServerSession, "_await_first_live", no_wait)
    site_file = write_site(tmp_path, SIM_TAGS)
    server = SimOpcUaServer(load_site(write_site(tmp_path, SIM_TAGS, name="sim-site.yaml")))

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        session = collector.sessions[0]
        await _until(session.connected.is_set, 15, "connected")
        await server.set_value("U-1", "t1", 1.0)
        await _until(lambda: any(p.fields.get("value") == 1.0 for p in _values(spool, "t1")), 10, "t1")
        await server.stop()
        await _until(lambda: not session.connected.is_set(), 15, "session loss detected")
        now = time.time_ns()
        await server.set_value("U-1", "t1", 7.0, source_ts=now + 1_000_000)
        await server.set_value("U-1", "t1", 8.0, source_ts=now + 2_000_000)
        await server.start()
        await _until(lambda: session.connections >= 2, 30, "reconnected")
        await _until(lambda: collector.metrics.counter("backfilled_total") >= 1, 15, "backfill")
        await server.set_value("U-1", "t1", 9.0)
        await _until(lambda: any(p.fields.get("value") == 9.0 for p in _values(spool, "t1")), 15, "live after restart")
        _assert_gap_closed_once(spool, now)

    asyncio.run(_run(tmp_path, server, lambda url: write_config(tmp_path, site_file, _opcua_section(url, NONE)), body))


def test_arrays_rejected_by_config(tmp_path: Path) -> None:
    site_file = write_site(tmp_path, SIM_TAGS + EXTRA_TAGS[4:5])
    server = SimOpcUaServer(load_site(write_site(tmp_path, SIM_TAGS, name="sim-site.yaml")))

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        await server.add_variable("U-1", "arr", [1, 2], ua.VariantType.Int32)
        await _until(lambda: collector.metrics.counter("rejected_total", reason="array_rejected") >= 1, 15, "reject")
        dead = (collector.runtime.rejects.dead_letter.path).read_text()
        assert "array_rejected" in dead and "U-1/arr" in dead

    def config(url: str) -> FlowlineConfig:
        return write_config(tmp_path, site_file, _opcua_section(url, NONE, arrays="reject"))

    asyncio.run(_run(tmp_path, server, config, body))


@pytest.fixture(scope="module")
def client_cert(pki: CertificateAuthority) -> Any:
    return pki.issue("flowline-collector", stem="opcua-client", uri="urn:flowline:collector")


@pytest.mark.parametrize(("policy", "mode"), [("Basic256Sha256", "SignAndEncrypt"), ("Aes256_Sha256_RsaPss", "Sign")])
def test_secure_session_with_username(
    tmp_path: Path, pki: CertificateAuthority, client_cert: Any, policy: str, mode: str
) -> None:
    site_file = write_site(tmp_path, SIM_TAGS)
    sim_site = load_site(site_file)
    server_policy = {"Basic256Sha256": "basic256sha256", "Aes256_Sha256_RsaPss": "aes256sha256rsapss"}[policy]
    server = SimOpcUaServer(
        sim_site, policies=(server_policy,), cert=server_certificate(pki, sim_site.site),
        users={"operator": "s3cret"}, trusted=(pki.files.cert,),
    )  # fmt: skip
    (tmp_path / "opcua-password").write_text("s3cret\n")
    security = _secure(client_cert, pki.files.cert, policy, mode)
    endpoint = {"username": "operator", "password": {"file": str(tmp_path / "opcua-password")}}

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        await _until(collector.sessions[0].connected.is_set, 20, "secure session")
        await server.set_value("U-1", "t1", 3.25)
        await _until(lambda: any(p.fields.get("value") == 3.25 for p in _values(spool, "t1")), 10, "value")

    def config(url: str) -> FlowlineConfig:
        return write_config(tmp_path, site_file, _opcua_section(url, security, endpoint=endpoint))

    asyncio.run(_run(tmp_path, server, config, body))


def test_untrusted_server_certificate_is_refused(tmp_path: Path, pki: CertificateAuthority, client_cert: Any) -> None:
    site_file = write_site(tmp_path, SIM_TAGS)
    sim_site = load_site(site_file)
    server = SimOpcUaServer(sim_site, policies=("basic256sha256",), cert=server_certificate(pki, sim_site.site))
    other_ca = CertificateAuthority(tmp_path / "other-ca")
    security = _secure(client_cert, other_ca.files.cert)

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        session = collector.sessions[0]
        await _until(lambda: session.last_error is not None, 15, "refusal")
        error = session.last_error
        assert isinstance(error, OpcUaSecurityError)
        assert "untrusted certificate" in str(error) and "trusted_server_certs" in str(error)
        saved = next((tmp_path / "data" / "pki" / "rejected").glob("default-*.der"))
        assert str(saved) in str(error)
        assert not session.connected.is_set() and telemetry(spool) == []

    asyncio.run(
        _run(tmp_path, server, lambda url: write_config(tmp_path, site_file, _opcua_section(url, security)), body)
    )


def test_server_refusing_our_client_certificate_gives_a_clear_error(
    tmp_path: Path, pki: CertificateAuthority, client_cert: Any
) -> None:
    site_file = write_site(tmp_path, SIM_TAGS)
    sim_site = load_site(site_file)
    other_ca = CertificateAuthority(tmp_path / "other-ca")
    server = SimOpcUaServer(
        sim_site,
        policies=("basic256sha256",),
        cert=server_certificate(pki, sim_site.site),
        trusted=(other_ca.files.cert,),
    )
    security = _secure(client_cert, pki.files.cert)

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        session = collector.sessions[0]
        await _until(lambda: session.last_error is not None, 15, "refusal")
        assert isinstance(session.last_error, OpcUaSecurityError), repr(session.last_error)
        assert "does not trust our client certificate" in str(session.last_error)

    asyncio.run(
        _run(tmp_path, server, lambda url: write_config(tmp_path, site_file, _opcua_section(url, security)), body)
    )


def test_assets_discover_reports_unknown_variables_and_missing_tags(tmp_path: Path) -> None:
    site_file = write_site(tmp_path, SIM_TAGS + EXTRA_TAGS[5:6])  # "missing": not on the server
    server = SimOpcUaServer(load_site(write_site(tmp_path, SIM_TAGS, name="sim-site.yaml")))

    async def main() -> None:
        await server.start()
        try:
            await server.add_variable("U-1", "extra", 1.0)
            proc = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "flowline"), "assets", "discover", "--opcua", server.url,
                "--site", str(site_file), "--insecure", "--json", stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await proc.communicate()
        finally:
            await server.stop()
        assert proc.returncode == 3
        report = json.loads(out)
        assert [v["browse_path"] for v in report["unknown"]] == ["0:Objects/2:test-site/2:U-1/2:extra"]
        assert report["unknown"][0]["node"] == "ns=2;s=U-1.extra"
        assert [(m["asset"], m["tag"]) for m in report["missing"]] == [("U-1", "missing")]
        assert report["variables"] == 3

    asyncio.run(main())


def test_wrong_password_is_refused_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site_file = write_site(tmp_path, SIM_TAGS)
    server = SimOpcUaServer(load_site(site_file), users={"operator": "right"})
    monkeypatch.setenv("FLOWLINE_TEST_OPCUA_PASSWORD", "wrong")
    endpoint = {"username": "operator", "password": {"env": "FLOWLINE_TEST_OPCUA_PASSWORD"}}

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        session = collector.sessions[0]
        await _until(lambda: session.last_error is not None, 15, "refusal")
        assert isinstance(session.last_error, OpcUaSecurityError), repr(session.last_error)
        assert "rejected user 'operator'" in str(session.last_error)

    def config(url: str) -> FlowlineConfig:
        return write_config(tmp_path, site_file, _opcua_section(url, NONE, endpoint=endpoint))

    asyncio.run(_run(tmp_path, server, config, body))


def test_values_refused_by_a_full_spool_are_read_back_by_history(tmp_path: Path) -> None:
    """The full-spool policy for OPC UA: values arriving while the spool cannot store are refused
    (counted), and HistoryRead reads them back once it takes data again."""
    site_file = write_site(tmp_path, SIM_TAGS)
    server = SimOpcUaServer(load_site(write_site(tmp_path, SIM_TAGS, name="sim-site.yaml")))

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        session, sink = collector.sessions[0], collector.runtime.sink
        await _until(session.connected.is_set, 15, "connected")
        value = 100.0
        while sink.accepting:  # fill the small spool with live values
            value += 1
            await server.set_value("U-1", "t1", value)
            await asyncio.sleep(0.05)
            assert value < 5000, "the spool never filled"
        now = time.time_ns() // 1000 * 1000
        await server.set_value("U-1", "t1", -7.0, source_ts=now - 2_000_000)
        await server.set_value("U-1", "t1", -8.0, source_ts=now - 1_000_000)
        await _until(lambda: collector.metrics.counter("refused_total", reason="spool_full") >= 2, 10, "refusals")
        assert sink.accepting is False
        reader = SpoolReader(spool)  # the relay drains the spool: room again
        for record in reader.read():
            reader.ack(record.end)
        await _until(lambda: sink.accepting, 15, "the spool to take data again")
        await server.set_value("U-1", "t1", 9.0)
        await _until(lambda: any(p.fields.get("value") == 9.0 for p in _values(spool, "t1")), 15, "live again")
        await _until(lambda: len(_values(spool, "t1", origin="backfill")) >= 2, 15, "the refused values read back")
        backfilled = [float(p.fields["value"]) for p in _values(spool, "t1", origin="backfill")]
        live = [float(p.fields["value"]) for p in _values(spool, "t1") if "origin" not in p.tags]
        assert backfilled[-2:] == [-7.0, -8.0]
        # The fill's last live value may have been refused too (the batch that found the spool full):
        # then it is read back as well, and never stored twice.
        assert all(v > 100 for v in backfilled[:-2]) and not set(backfilled) & set(live), (backfilled, live)
        assert live[-1] == 9.0  # live once

    def config(url: str) -> FlowlineConfig:
        return write_config(
            tmp_path, site_file, _opcua_section(url, NONE), spool={"max_bytes": 3000, "segment_bytes": 600}
        )

    asyncio.run(_run(tmp_path, server, config, body))
