"""Local InfluxDB and Mosquitto processes, for the demo and the test fixtures.

Each server gets its own folder, config file and free loopback ports (InfluxDB's RPC bind-address
too), so several can run side by side and nothing touches system paths. Debian's packages provide
the binaries (``influxdb``: InfluxDB 1.6, v1 API; ``mosquitto``).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import requests

from flowline.core.errors import FlowlineError


class ServiceError(FlowlineError):
    """A local service could not be started or is not installed."""


def free_port() -> int:
    """A port that was free a moment ago; callers retry on a bind failure (another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it holds; raise ``TimeoutError`` naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if predicate():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def find_binary(name: str, package: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    raise ServiceError(
        f"{name} is not installed: run 'sudo apt-get install {package}' (Debian/Ubuntu package {package!r})"
    )


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class ManagedProcess:
    """A child process with a log file, started and stopped explicitly (also as a context manager)."""

    name = "process"
    start_timeout = 30.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write configuration before the first start (ports are chosen here)."""

    def start(self) -> None:
        if self.running:
            return
        if self._proc is None:
            self.prepare()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_until(
                lambda: self._alive_or_raise() and self.ready(), self.start_timeout, f"{self.name} to start"
            )
        except Exception:
            self.stop()
            raise

    def _alive_or_raise(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise ServiceError(f"{self.name} exited with code {self._proc.returncode}; log tail:\n{tail}")
        return True

    @property
    def pid(self) -> int | None:
        """The child's process id (also its process group: it runs in a session of its own)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last run (negative: the signal that ended it), None while it runs."""
        return self._proc.poll() if self._proc is not None else None

    def stop(self, timeout: float = 15.0) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=15)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> ManagedProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass(frozen=True)
class InfluxUser:
    name: str
    password: str
    admin: bool = False
    # (database, privilege) with privilege READ, WRITE or ALL
    grants: tuple[tuple[str, str], ...] = ()


class InfluxDServer(ManagedProcess):
    """InfluxDB 1.x (Debian's ``influxd``) with data, meta and WAL in ``workdir``.

    With ``auth=True`` the server requires credentials; ``admin`` holds the admin user's password and
    ``users`` can be created with least-privilege grants through :meth:`create_user`.
    """

    name = "influxd"

    def __init__(
        self,
        workdir: Path,
        auth: bool = False,
        admin_password: str | None = None,
        host: str = "127.0.0.1",
        http_port: int = 0,
    ) -> None:
        super().__init__(workdir)
        self.auth = auth
        self.host = host  # the HTTP API's address (the network lab binds it to the IT zone's address)
        self.admin = InfluxUser("admin", admin_password or os.urandom(12).hex(), admin=True)
        self.http_port = http_port  # 0: a free port, chosen at the first start
        self.rpc_port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def prepare(self) -> None:
        self.http_port, self.rpc_port = self.http_port or free_port(), free_port()
        data = self.workdir / "data"
        config = f"""
reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"
[meta]
  dir = "{data / "meta"}"
[data]
  dir = "{data / "data"}"
  wal-dir = "{data / "wal"}"
  query-log-enabled = false
  cache-snapshot-write-cold-duration = "1m"
[coordinator]
  write-timeout = "30s"
[monitor]
  store-enabled = false
[http]
  enabled = true
  bind-address = "{self.host}:{self.http_port}"
  auth-enabled = {str(self.auth).lower()}
  log-enabled = false
  max-body-size = 0
[logging]
  level = "warn"
[continuous_queries]
  enabled = false
[subscriber]
  enabled = false
"""
        (self.workdir / "influxdb.conf").write_text(config)

    def command(self) -> list[str]:
        return [find_binary("influxd", "influxdb"), "-config", str(self.workdir / "influxdb.conf")]

    def ready(self) -> bool:
        if requests.get(f"{self.url}/ping", timeout=1).status_code != 204:
            return False
        if self.auth:
            self._ensure_admin()
        return True

    def _ensure_admin(self) -> None:
        admin_auth = (self.admin.name, self.admin.password)
        probe = requests.get(f"{self.url}/query", params={"q": "SHOW USERS"}, auth=admin_auth, timeout=5)
        if probe.status_code == 200:
            return
        # InfluxDB 1.x accepts the first admin user without credentials while no user exists yet.
        create = f"CREATE USER {self.admin.name} WITH PASSWORD '{self.admin.password}' WITH ALL PRIVILEGES"
        requests.post(f"{self.url}/query", params={"q": create}, timeout=5).raise_for_status()

    def query(self, q: str, db: str | None = None) -> dict[str, object]:
        """Run an InfluxQL statement as the admin (fixtures and demo set-up only)."""
        params = {"q": q, "epoch": "ns"}
        if db:
            params["db"] = db
        auth = (self.admin.name, self.admin.password) if self.auth else None
        response = requests.post(f"{self.url}/query", params=params, auth=auth, timeout=30)
        response.raise_for_status()
        result: dict[str, object] = response.json()
        return result

    def create_database(self, db: str) -> None:
        self.query(f'CREATE DATABASE "{db}"')

    def create_user(self, user: InfluxUser) -> None:
        admin = " WITH ALL PRIVILEGES" if user.admin else ""
        self.query(f"CREATE USER \"{user.name}\" WITH PASSWORD '{user.password}'{admin}")
        for db, privilege in user.grants:
            self.query(f'GRANT {privilege} ON "{db}" TO "{user.name}"')


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


class MosquittoServer(ManagedProcess):
    """Mosquitto with its own config: a plain listener and/or a TLS listener, on free loopback ports.

    Authentication is on by default (``users``: name -> password); ``acl`` lines are written verbatim.
    ``max_queued_messages`` is raised because the default (1,000) drops QoS 1 messages under bursts.
    """

    name = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        users: dict[str, str] | None = None,
        acl: list[str] | None = None,
        tls: TlsFiles | None = None,
        allow_anonymous: bool = False,
        require_certificate: bool = False,
        plain: bool = True,
    ) -> None:
        super().__init__(workdir)
        if not plain and tls is None:
            raise ValueError("a broker without a plain listener needs tls")
        self.plain = plain  # tests of plain MQTT need it; the demo and the lab run TLS only
        self.users = users or {}
        self.acl = acl
        self.tls = tls
        self.allow_anonymous = allow_anonymous
        self.require_certificate = require_certificate  # mutual TLS on the TLS listener
        self.port = 0
        self.tls_port = 0

    def prepare(self) -> None:
        self.port = free_port()
        lines = [
            # Mosquitto drops root privileges to its own user unless told otherwise; stay the file owner.
            f"user {getpass.getuser()}",
            "per_listener_settings false",
            f"allow_anonymous {str(self.allow_anonymous).lower()}",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            "max_queued_messages 1000000",
            "max_inflight_messages 1000",
            "message_size_limit 0",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
        ]
        if self.plain:
            lines.append(f"listener {self.port} 127.0.0.1")
        if self.tls is not None:
            self.tls_port = free_port()
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.cert}",
                f"keyfile {self.tls.key}",
                "tls_version tlsv1.2",
                f"require_certificate {str(self.require_certificate).lower()}",
            ]
        if self.users:
            passwd = self.workdir / "passwd"
            passwd.write_text("")
            for user, password in self.users.items():
                subprocess.run(
                    [find_binary("mosquitto_passwd", "mosquitto"), "-b", str(passwd), user, password],
                    check=True,
                    capture_output=True,
                )
            passwd.chmod(0o600)
            lines.append(f"password_file {passwd}")
        if self.acl is not None:
            acl_file = self.workdir / "acl"
            acl_file.write_text("\n".join(self.acl) + "\n")
            acl_file.chmod(0o600)
            lines.append(f"acl_file {acl_file}")
        (self.workdir / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return [find_binary("mosquitto", "mosquitto"), "-c", str(self.workdir / "mosquitto.conf")]

    def ready(self) -> bool:
        return (not self.plain or port_open(self.port)) and (self.tls is None or port_open(self.tls_port))
