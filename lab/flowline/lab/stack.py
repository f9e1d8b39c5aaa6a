"""A whole Flowline install on one machine: what `flowline demo` runs and the end-to-end tests use.

`LocalStack` makes a throw-away PKI, secrets files, a local InfluxDB (authentication on, one user per
role with least privilege) and Mosquitto (TLS and passwords), writes one deployment config file,
and starts every stage as its own process, exactly as a site would run them:

    simulator ─► collectors (OPC UA, MQTT) ─► OT spools ─► relay ot ══mTLS══► relay dmz ─► DMZ spool
                                                                              relay writer ─► InfluxDB

Each stage is a `flowline …` subprocess with its log in ``workdir/logs``; nothing is shared in
memory, so the process boundaries (and what survives a kill) are the real ones.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowline.core.config import HistorianConfig
from flowline.core.files import atomic_write_json
from flowline.historian.connection import Connection
from flowline.historian.setup import Account, setup_v1
from flowline.inventory import load_site
from flowline.lab.pki import CertFiles, CertificateAuthority
from flowline.lab.services import (
    InfluxDServer,
    ManagedProcess,
    MosquittoServer,
    ServiceError,
    TlsFiles,
    free_port,
    wait_until,
)
from flowline.lab.sim.opcua_server import server_certificate

DATABASE = "flowline"
# InfluxDB account per role (grants in flowline.historian.setup.grants_for).
INFLUX_ACCOUNTS = {
    "writer": "flowline_writer",
    "rollup": "flowline_rollup",
    "analytics": "flowline_analytics",
    "grafana": "grafana",
}
SENDER_ID = "ot-north-1"
EXAMPLE_SITE = Path(__file__).resolve().parent / "examples" / "north-field.yaml"
STATE_FILE = "stack.json"  # in the workdir of a stack left running (`flowline demo --keep`)


class StageProcess(ManagedProcess):
    """One `flowline …` command run as a child process; ready once it prints its READY line (if any)."""

    start_timeout = 60.0

    def __init__(self, workdir: Path, name: str, args: list[str], ready_marker: str | None = None) -> None:
        self.name = name
        super().__init__(workdir)
        self.args = args
        self.ready_marker = ready_marker
        self._start_offset = 0

    def command(self) -> list[str]:
        return [sys.executable, "-m", "flowline.core", *self.args]

    def start(self) -> None:
        self._start_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        super().start()

    def ready(self) -> bool:
        if self.ready_marker is None:
            return True
        with open(self.log_path, "rb") as log:
            log.seek(self._start_offset)
            return self.ready_marker.encode() in log.read()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


@dataclass
class StackOptions:
    site_file: Path = EXAMPLE_SITE
    seed: int = 7
    backfill_days: float = 14.0
    backfill_step_s: float = 60.0
    simulate: bool = True  # run `flowline sim run`; tests may bring their own OPC UA server instead
    opcua_url: str | None = None  # an external OPC UA server (when simulate is False)
    opcua_server_cert: Path | None = None  # its certificate, for the collector's trust list
    opcua_security: str = "Basic256Sha256"
    extra_env: dict[str, str] = field(default_factory=dict)


class LocalStack:
    def __init__(self, workdir: Path, options: StackOptions | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.options = options or StackOptions()
        self.data_dir = self.workdir / "data"
        self.secrets_dir = self.workdir / "secrets"
        self.logs_dir = self.workdir / "logs"
        self.config_path = self.workdir / "flowline.yaml"
        self.influx = InfluxDServer(self.workdir / "influxdb", auth=True)
        self.mosquitto: MosquittoServer | None = None
        self.stages: dict[str, StageProcess] = {}
        self.passwords: dict[str, str] = {}
        self.opcua_port = 0
        self.sim_certs: CertFiles | None = None
        # One fault timeline for backfill and live values: the plant's "now" is fixed at set-up.
        self.epoch_ns = time.time_ns()

    # --- set-up ------------------------------------------------------------------------------------

    def _secret(self, name: str, value: str | None = None) -> Path:
        """Write a secret to its own 0600 file; configs reference the file, never the value."""
        value = value if value is not None else secrets.token_urlsafe(18)
        self.passwords[name] = value
        path = self.secrets_dir / name
        path.write_text(value + "\n")
        path.chmod(0o600)
        return path

    def prepare(self) -> None:
        for folder in (self.data_dir, self.secrets_dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.secrets_dir.chmod(0o700)
        pki = CertificateAuthority(self.workdir / "pki", name="Flowline demo CA")
        self.ca = pki
        self.broker_cert = pki.issue("mosquitto", stem="broker")
        self.gateway_cert = pki.issue("dmz-gateway", stem="gateway", server=True, client=False)
        self.sender_cert = pki.issue(SENDER_ID, stem="ot-sender", server=False, client=True)
        self.collector_cert = pki.issue(
            "flowline-collector", stem="opcua-collector", uri="urn:flowline:collector", server=False
        )
        # The simulator finds its server certificate as opcua-server.* in --cert-dir (the CA's folder).
        self.sim_certs = server_certificate(pki, load_site(self.options.site_file).site)
        self._secret("signing-key", secrets.token_hex(32))
        # Kept so a stack left running can still be administered (and inspected) by hand.
        self._secret("influx-admin", self.influx.admin.password)
        for name in (*(f"influx-{role}" for role in INFLUX_ACCOUNTS), "mqtt-collector", "mqtt-sim"):
            self._secret(name)

    def start_services(self) -> None:
        self.influx.start()
        self.setup_historian()
        self.mosquitto = self.new_mosquitto(
            self.workdir / "mosquitto",
            users={"collector": self.passwords["mqtt-collector"], "sim": self.passwords["mqtt-sim"]},
            acl=["user collector", "topic read #", "topic read $share/#", "user sim", "topic readwrite #"],
            tls=TlsFiles(self.ca.files.cert, self.broker_cert.cert, self.broker_cert.key),
            plain=False,  # every client here speaks TLS: a plain listener would only be an unused way in
        )
        self.mosquitto.start()

    def setup_historian(self) -> list[str]:
        """The historian's own set-up, as a site runs it: database, retention tiers (raw, rollup_1m,
        rollup_1h) and one account per role with only its grants (flowline.historian.setup).

        Returns the statements run (passwords redacted). The network lab runs this from its IT zone.
        """
        influx_admin = self.influx.admin
        admin = Connection(self.influx.url, DATABASE, username=influx_admin.name, password=influx_admin.password)
        accounts = {role: Account(name, self.passwords[f"influx-{role}"]) for role, name in INFLUX_ACCOUNTS.items()}
        try:
            return setup_v1(admin, HistorianConfig(url=self.influx.url, database=DATABASE), accounts)
        finally:
            admin.close()  # its socket lives where set-up ran (the lab: the IT namespace)

    def new_mosquitto(self, workdir: Path, **options: Any) -> MosquittoServer:
        """The broker (the network lab runs it inside its OT namespace)."""
        return MosquittoServer(workdir, **options)

    def write_config(self) -> Path:
        assert self.mosquitto is not None
        opts = self.options
        self.opcua_port = free_port()
        opcua_url = opts.opcua_url or f"opc.tcp://127.0.0.1:{self.opcua_port}/flowline/sim"
        server_cert = opts.opcua_server_cert or (self.sim_certs.der if self.sim_certs else None)
        secure = opts.opcua_security != "None"
        config: dict[str, Any] = {
            "site_file": str(opts.site_file),
            "data_dir": str(self.data_dir),
            "instance": "demo",
            "metrics_interval_s": 2,
            "collectors": {
                "opcua": {
                    "servers": {
                        "default": {
                            "url": opcua_url,
                            "security": {
                                "policy": opts.opcua_security,
                                "mode": "SignAndEncrypt" if secure else "None",
                                "cert_file": str(self.collector_cert.der),
                                "key_file": str(self.collector_cert.key),
                                "trusted_server_certs": [str(server_cert)] if server_cert else [],
                                "application_uri": "urn:flowline:collector",
                            },
                        }
                    },
                },
                "mqtt": {
                    "broker": {
                        "host": "127.0.0.1",
                        "port": self.mosquitto.tls_port,
                        "tls": {"ca_file": str(self.ca.files.cert)},
                        "username": "collector",
                        "password": {"file": str(self.secrets_dir / "mqtt-collector")},
                        "client_id": "flowline-demo-collector",
                    },
                },
            },
            "relay_ot": {
                "sender_id": SENDER_ID,
                "gateway_host": "127.0.0.1",
                "gateway_port": free_port(),
                "tls": {
                    "ca_file": str(self.ca.files.cert),
                    "cert_file": str(self.sender_cert.cert),
                    "key_file": str(self.sender_cert.key),
                },
                "signing_key": {"file": str(self.secrets_dir / "signing-key")},
                "spools": ["opcua", "mqtt", "backfill"],
            },
            "historian": {
                "url": self.influx.url,
                "database": DATABASE,
                "username": "flowline_writer",
                "password": {"file": str(self.secrets_dir / "influx-writer")},
            },
            "analytics": {"historian": self._historian_account("analytics")},
            "rollup": {"historian": self._historian_account("rollup")},
        }
        config["relay_dmz"] = {
            "listen_host": "127.0.0.1",
            "listen_port": config["relay_ot"]["gateway_port"],
            "tls": {
                "cert_file": str(self.gateway_cert.cert),
                "key_file": str(self.gateway_cert.key),
                "client_ca_file": str(self.ca.files.cert),
            },
            "sender_keys": {SENDER_ID: {"file": str(self.secrets_dir / "signing-key")}},
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return self.config_path

    def _historian_account(self, role: str) -> dict[str, Any]:
        return {
            "url": self.influx.url,
            "database": DATABASE,
            "username": INFLUX_ACCOUNTS[role],
            "password": {"file": str(self.secrets_dir / f"influx-{role}")},
        }

    # --- stages -------------------------------------------------------------------------------------

    def stage(self, name: str, args: list[str], ready_marker: str | None = None) -> StageProcess:
        process = StageProcess(self.logs_dir, name, args, ready_marker)
        self.stages[name] = process
        return process

    def sim_args(self) -> list[str]:
        assert self.mosquitto is not None and self.sim_certs is not None
        opts = self.options
        policy = "basic256sha256" if opts.opcua_security != "None" else "none"
        return [
            *("sim", "run", "--site", str(opts.site_file), "--seed", str(opts.seed), "--epoch", str(self.epoch_ns)),
            *("--opcua-port", str(self.opcua_port), "--opcua-security", policy),
            *("--cert-dir", str(self.sim_certs.cert.parent)),
            *("--mqtt-host", "127.0.0.1", "--mqtt-port", str(self.mosquitto.tls_port)),
            *("--mqtt-tls-ca", str(self.ca.files.cert), "--mqtt-user", "sim"),
            *("--mqtt-password-file", str(self.secrets_dir / "mqtt-sim")),
        ]

    def backfill(self) -> None:
        """Write history through the pipeline: into an OT spool that the sender forwards."""
        opts = self.options
        command = [
            *(sys.executable, "-m", "flowline.core", "sim", "backfill", "--site", str(opts.site_file)),
            *("--seed", str(opts.seed), "--epoch", str(self.epoch_ns), "--end", str(self.epoch_ns)),
            *("--spool", str(self.data_dir / "spool" / "backfill")),
            *("--days", str(opts.backfill_days), "--step", str(opts.backfill_step_s)),
        ]
        with open(self.logs_dir / "backfill.log", "ab") as log:
            subprocess.run(command, check=True, env=self.env(), stdout=log, stderr=subprocess.STDOUT)

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.options.extra_env}

    def start_pipeline(self) -> None:
        config = str(self.config_path)
        # Downstream first, so nothing upstream waits on a stage that is not there yet.
        self.stage("relay-dmz", ["relay", "dmz", "--config", config], "READY").start()
        self.stage("relay-writer", ["relay", "writer", "--config", config], "READY").start()
        self.stage("relay-ot", ["relay", "ot", "--config", config], "READY").start()
        if self.options.simulate:
            self.stage("sim", self.sim_args(), "READY").start()
        self.stage("collect-opcua", ["collect", "opcua", "--config", config], "READY").start()
        self.stage("collect-mqtt", ["collect", "mqtt", "--config", config], "READY").start()

    def start(self, backfill: bool = True) -> None:
        self.prepare()
        self.start_services()
        self.write_config()
        if backfill and self.options.backfill_days > 0:
            self.backfill()
        self.start_pipeline()

    def stop(self) -> None:
        # Upstream first, so downstream stages can drain what is in flight.
        for process in reversed(list(self.stages.values())):
            process.stop()
        if self.mosquitto is not None:
            self.mosquitto.stop()
        self.influx.stop()

    def processes(self) -> list[tuple[str, ManagedProcess]]:
        """Every process of the stack in start order (servers first, then the stages)."""
        servers: list[tuple[str, ManagedProcess]] = [("influxd", self.influx)]
        if self.mosquitto is not None:
            servers.append(("mosquitto", self.mosquitto))
        return servers + list(self.stages.items())

    def save_state(self, **extra: Any) -> Path:
        """Record the running processes so `stop_kept` can stop them from another process later."""
        entries = []
        for name, process in self.processes():
            pid = process.pid
            if pid is not None:
                entries.append({"name": name, "pid": pid, "cmdline": _cmdline(pid)})
        state = {
            "config": str(self.config_path),
            "influx_url": self.influx.url,
            "epoch_ns": self.epoch_ns,
            "seed": self.options.seed,
            "processes": entries,
            **extra,
        }
        path = self.workdir / STATE_FILE
        atomic_write_json(path, state)
        return path

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- reading back -------------------------------------------------------------------------------

    def query(self, q: str) -> list[dict[str, Any]]:
        """Rows of an InfluxQL query as dicts (one list over all series, with the series tags merged in)."""
        result: dict[str, Any] = self.influx.query(q, db=DATABASE)
        rows: list[dict[str, Any]] = []
        for statement in result.get("results", []):
            if "error" in statement:
                raise RuntimeError(f"InfluxQL error for {q!r}: {statement['error']}")
            for series in statement.get("series", []):
                columns = series["columns"]
                for values in series["values"]:
                    rows.append({**series.get("tags", {}), **dict(zip(columns, values, strict=True))})
        return rows

    def wait_for(self, q: str, predicate: Any, timeout: float, what: str) -> list[dict[str, Any]]:
        """Poll an InfluxQL query until ``predicate(rows)`` holds; on timeout, show the stage logs."""
        holder: list[list[dict[str, Any]]] = [[]]

        def check() -> bool:
            holder[0] = self.query(q)
            return bool(predicate(holder[0]))

        try:
            wait_until(check, timeout, what, interval=0.5)
        except TimeoutError as exc:
            logs = "\n".join(f"--- {name} ---\n{p.log_tail(1500)}" for name, p in self.stages.items())
            raise TimeoutError(f"{exc}\n{logs}") from exc
        return holder[0]


# --- a stack left running --------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


@dataclass(frozen=True)
class KeptProcess:
    name: str
    pid: int
    cmdline: tuple[str, ...]

    @property
    def running(self) -> bool:
        """Alive and still the process we started: a recycled pid runs another command line."""
        current = _cmdline(self.pid)
        return bool(current) and tuple(current) == self.cmdline


@dataclass(frozen=True)
class KeptStack:
    """What `flowline demo --keep` left running, read back from ``workdir/stack.json``."""

    workdir: Path
    config: Path
    influx_url: str
    processes: tuple[KeptProcess, ...]
    raw: dict[str, Any]

    @classmethod
    def load(cls, workdir: Path) -> KeptStack | None:
        path = Path(workdir) / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ServiceError(f"{path}: unreadable stack state ({exc}); delete it and start again") from exc
        processes = tuple(
            KeptProcess(str(p["name"]), int(p["pid"]), tuple(p.get("cmdline", []))) for p in data.get("processes", [])
        )
        return cls(Path(workdir).resolve(), Path(data["config"]), str(data["influx_url"]), processes, data)

    @property
    def running(self) -> list[KeptProcess]:
        return [p for p in self.processes if p.running]

    def stop(self, timeout: float = 20.0) -> list[str]:
        """Stop every process still running, upstream first (as `LocalStack.stop`); returns the names
        that needed SIGKILL. The state file is removed, so the workdir is free for the next run."""
        killed = []
        for process in reversed(self.processes):
            if not process.running:
                continue
            os.kill(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while process.running and time.monotonic() < deadline:
                time.sleep(0.1)
            if process.running:
                os.kill(process.pid, signal.SIGKILL)
                killed.append(process.name)
                while process.running:
                    time.sleep(0.05)
        (self.workdir / STATE_FILE).unlink(missing_ok=True)
        return killed
