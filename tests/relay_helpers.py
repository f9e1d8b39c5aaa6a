"""Test rig for the relay: certificates, keys, a small site, configs, and real relay processes."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flowline.core.config import FlowlineConfig, load_config
from flowline.core.points import Point, TagRef, telemetry_point
from flowline.core.spool import SpoolReader, SpoolWriter, decode_points
from flowline.lab.pki import CertFiles, CertificateAuthority
from flowline.lab.services import InfluxDServer, InfluxUser, free_port, port_open, wait_until
from tests.influx_tap import InfluxWriteTap

FLOWLINE = str(Path(sys.executable).parent / "flowline")  # the installed entry point
SENDER = "ot-test-1"

SITE_YAML = """
site: test-site
assets:
  - id: P-101
    name: Export pump A
    type: centrifugal_pump
    criticality: A
    consequence: {safety: high, environment: medium, production: high}
    tags:
      - name: vibration_rms
        unit: mm/s
        source: {opcua: {node: "ns=2;s=P101.Vibration"}}
      - name: bearing_temp
        unit: degC
        source: {mqtt: {topic: "plant/P-101/bearing_temp"}}
  - id: X-900
    name: Not approved
    type: compressor
    criticality: C
    consequence: {safety: low, environment: low, production: low}
    tags:
      - name: secret_tag
        source: {opcua: {node: "ns=2;s=X900"}}
flows:
  - sender: ot-test-1
    assets: ["P-*"]
"""


def points(
    n: int,
    start_ns: int = 1_700_000_000_000_000_000,
    asset: str = "P-101",
    tag: str = "vibration_rms",
    step_ns: int = 1_000_000,
) -> list[Point]:
    ref = TagRef("test-site", asset, tag, "mm/s")
    return [telemetry_point(ref, float(i % 1000) / 10, start_ns + i * step_ns) for i in range(n)]


@dataclass
class RelayRig:
    """Two installs (OT and DMZ) in temp folders sharing one CA; configs written as YAML files."""

    root: Path
    pki: CertificateAuthority
    influx: InfluxDServer | None = None
    database: str | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    tap: InfluxWriteTap | None = None
    log_paths: dict[int, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "site.yaml").write_text(SITE_YAML)
        self.key_file = self.root / "sender.key"
        self.key_file.write_text(secrets.token_hex(32))
        self.server: CertFiles = self.pki.issue("dmz-gateway", stem="gateway", client=False)
        self.client: CertFiles = self.pki.issue(SENDER, stem="sender", server=False)
        self.port = free_port()
        self.diode_port = free_port()
        self.ot_path = self.write_ot_config()
        self.dmz_path = self.write_dmz_config()

    def write_ot_config(self, name: str = "ot.yaml", **overrides: object) -> Path:
        relay_ot: dict[str, object] = {
            "sender_id": SENDER,
            "gateway_host": "127.0.0.1",
            "gateway_port": self.port,
            "tls": {
                "ca_file": str(self.pki.files.cert),
                "cert_file": str(self.client.cert),
                "key_file": str(self.client.key),
                "server_name": "localhost",
            },
            "signing_key": {"file": str(self.key_file)},
            "spools": ["opcua"],
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 1.0,
            "ack_timeout_s": 10,
            "diode_host": "127.0.0.1",
            "diode_port": self.diode_port,
            **overrides,
        }
        doc = {
            "site_file": str(self.root / "site.yaml"),
            "data_dir": str(self.root / "ot"),
            "metrics_interval_s": 1,
            "relay_ot": relay_ot,
        }
        path = self.root / name
        path.write_text(yaml.safe_dump(doc))
        return path

    def write_dmz_config(self) -> Path:
        doc: dict[str, object] = {
            "site_file": str(self.root / "site.yaml"),
            "data_dir": str(self.root / "dmz"),
            "metrics_interval_s": 1,
            "relay_dmz": {
                "listen_host": "127.0.0.1",
                "listen_port": self.port,
                "tls": {
                    "cert_file": str(self.server.cert),
                    "key_file": str(self.server.key),
                    "client_ca_file": str(self.pki.files.cert),
                },
                "sender_keys": {SENDER: {"file": str(self.key_file)}},
                "max_frame_bytes": 8 << 20,
                "diode_listen_host": "127.0.0.1",
                "diode_listen_port": self.diode_port,
                "diode_gap_timeout_s": 2,
            },
        }
        if self.influx is not None and self.database is not None:
            password = secrets.token_hex(8)
            user = "w_" + secrets.token_hex(4)
            self.influx.create_user(InfluxUser(user, password, grants=((self.database, "WRITE"),)))
            (self.root / "influx.pw").write_text(password)
            doc["historian"] = {
                "url": self.tap.url if self.tap is not None else self.influx.url,
                "database": self.database,
                "username": user,
                "password": {"file": str(self.root / "influx.pw")},
                "retry_deadline_s": 5,
            }
        path = self.root / "dmz.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def tap_writes(self) -> InfluxWriteTap:
        """Put a recording proxy between the writer and InfluxDB (before starting the writer)."""
        assert self.influx is not None
        self.tap = InfluxWriteTap(self.influx.url).start()
        self.dmz_path = self.write_dmz_config()
        return self.tap

    def update_dmz(self, **relay_dmz: object) -> None:
        """Change keys of the DMZ config's relay_dmz section (before starting what reads it)."""
        doc = yaml.safe_load(self.dmz_path.read_text())
        doc["relay_dmz"].update(relay_dmz)
        self.dmz_path.write_text(yaml.safe_dump(doc))

    @property
    def ot(self) -> FlowlineConfig:
        return load_config(self.ot_path)

    @property
    def dmz(self) -> FlowlineConfig:
        return load_config(self.dmz_path)

    def ot_spool(self, name: str = "opcua", max_bytes: int = 1 << 30) -> SpoolWriter:
        return SpoolWriter(self.ot.spool_dir(name), max_bytes=max_bytes, segment_bytes=256 << 10)

    # --- processes ---------------------------------------------------------------------------------

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        path = self.root / f"{args[0]}-{len(self.procs)}.log"
        # ``python -m flowline.relay`` skips importing every other command group: much faster restarts.
        with open(path, "wb") as log:  # the child keeps its copy
            proc = subprocess.Popen(
                [sys.executable, "-m", "flowline.relay", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.procs.append(proc)
        self.log_paths[proc.pid] = path
        return proc

    def wait_ready(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
        """Until the process printed its READY line (it is serving), or fail with the logs."""
        path = self.log_paths[proc.pid]
        try:
            wait_until(lambda: b"READY" in path.read_bytes() or proc.poll() is not None, timeout, f"{path.stem} READY")
        except TimeoutError:
            print(self.logs())
            raise
        assert proc.poll() is None, self.logs()

    def start_gateway(self) -> subprocess.Popen[bytes]:
        proc = self.start("dmz", "--config", str(self.dmz_path))
        wait_until(lambda: port_open(self.port) or proc.poll() is not None, 20, "DMZ gateway to listen")
        assert proc.poll() is None, self.logs()
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.root.glob("*.log"))
        )

    def stop_all(self) -> None:
        if self.tap is not None:
            self.tap.stop()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def count(self, measurement: str = "telemetry", where: str = "", field: str = "quality") -> int:
        assert self.influx is not None and self.database is not None
        result = self.influx.query(f'SELECT count("{field}") FROM "{measurement}" {where}', db=self.database)
        series = result["results"][0].get("series")  # type: ignore[index]
        return int(series[0]["values"][0][1]) if series else 0


class GatewayThread:
    """The DMZ gateway on a real loopback socket, in this process (for tests that inspect its state)."""

    def __init__(self, config: FlowlineConfig) -> None:
        import asyncio
        import threading

        from flowline.relay.dmz.gateway import Gateway

        self.gateway = Gateway(config)
        ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            started = asyncio.Event()
            task = asyncio.ensure_future(self.gateway.serve(self._stop, started))
            await started.wait()
            ready.set()
            await task

        self._thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
        self._thread.start()
        if not ready.wait(20):
            raise TimeoutError("gateway did not start")

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)


def tls_client(rig: RelayRig, cert: CertFiles | None, ca: Path | None = None) -> ssl.SSLSocket:
    """A raw TLS connection to the rig's gateway with the given client certificate (or none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(ca or rig.pki.files.cert)
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    raw = socket.create_connection(("127.0.0.1", rig.port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def read_ack(sock: ssl.SSLSocket, key: bytes, sender: str = SENDER) -> int:
    """Sequence number of the next ACK; raises ConnectionError/OSError when the gateway hung up."""
    from flowline.relay.frames import decode_frame, frame_length
    from flowline.relay.ot.sender import recv_exactly

    length = frame_length(recv_exactly(sock, 4))
    frame = decode_frame(recv_exactly(sock, length), lambda s: key if s == sender else None)
    return frame.sequence


_FIELD = re.compile(r'([^=,]+)=("(?:[^"\\]|\\.)*"|[^,]*)')


def _parse_rest(rest: str) -> tuple[dict[str, object], int]:
    """Fields and timestamp of the part of a line after its series key (test-side reader)."""
    fields_text, ts = rest.rsplit(" ", 1)
    fields: dict[str, object] = {}
    for key, raw in _FIELD.findall(fields_text):
        if raw.startswith('"'):
            fields[key] = raw[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        elif raw.endswith("i"):
            fields[key] = int(raw[:-1])
        elif raw in ("true", "false"):
            fields[key] = raw == "true"
        else:
            fields[key] = float(raw)
    return fields, int(ts)


def unacked_points(folder: Path, relay_bodies: bool, measurement: str = "telemetry") -> int:
    """Points of ``measurement`` in a spool's records not yet acknowledged by its reader.

    This is the most a reader killed now can replay: the chaos tests bound duplicates by it.
    OT spools hold point records, the DMZ spool holds relay bodies (``relay_bodies``).
    """
    from flowline.relay.body import decode_body

    n = 0
    for record in SpoolReader(folder).read(max_records=1_000_000, max_bytes=1 << 40):
        if relay_bodies:
            series, raw = decode_body(record.payload)
            n += sum(len(rests) for name, _, rests in series if name == measurement)
            n += sum(1 for item in raw if isinstance(item, list) and item[:1] == [measurement])
        else:
            n += sum(1 for p in decode_points(record.payload) if p.measurement == measurement)
    return n


def dmz_points(config: FlowlineConfig) -> list[Point]:
    """Everything in the DMZ spool, as points."""
    from flowline.core.spool import SpoolReader
    from flowline.relay.body import decode_body

    out: list[Point] = []
    for record in SpoolReader(config.spool_dir("dmz")).read(max_records=1_000_000, max_bytes=1 << 40):
        series, raw = decode_body(record.payload)
        for measurement, tags, rests in series:
            for rest in rests:
                fields, ts = _parse_rest(rest)
                out.append(Point(measurement, tags, fields, ts))  # type: ignore[arg-type]
        out += [Point.from_wire(item) for item in raw]
    return out
