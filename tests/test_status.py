"""Status files (flowline/status.py), `flowline status`, the systemd notify protocol and the unit files."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowline.core.cli import main
from flowline.core.metrics import Metrics
from flowline.core.spool import SpoolWriter
from flowline.core.status import PROCESS_NAMES, ProcessStatus, process_name, read_all, verdict
from tests.conftest import unavailable

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def test_status_file_follows_the_stage_metrics_and_spool(tmp_path: Path) -> None:
    metrics = Metrics("collector-mqtt", "site", "test")
    spool = SpoolWriter(tmp_path / "spool" / "mqtt", fsync=False)
    spool.append([b"x" * 100])
    status = ProcessStatus(tmp_path, "collector-mqtt").watch(metrics, "source").spool("mqtt", spool.folder)
    status.start()
    try:
        metrics.inc("connect_attempts_total", 3, target="mqtt://b:1883")
        metrics.inc("connect_failures_total", 3, target="mqtt://b:1883")
        metrics.set("connected", 0, target="mqtt://b:1883")
        status.connected("mqtt://b:1883", "source", False, error="connection refused (ECONNREFUSED)")
        status.write()
        doc = json.loads((tmp_path / "status" / "collector-mqtt.json").read_text())
        link = doc["links"]["mqtt://b:1883"]
        assert (link["kind"], link["connected"], link["connect_attempts"], link["connect_failures"]) == (
            "source",
            False,
            3,
            3,
        )
        assert link["last_error"] == "connection refused (ECONNREFUSED)" and link["since"]
        assert doc["state"] == "degraded" and doc["pid"] == os.getpid()
        assert doc["spools"]["mqtt"]["depth_bytes"] > 100  # the record plus its framing, not yet acknowledged
        assert doc["last_read"] is None

        metrics.set("connected", 1, target="mqtt://b:1883")
        metrics.inc("points_in_total", 5)
        status.ok("mqtt://b:1883", "source")
        status.write()
        doc = json.loads((tmp_path / "status" / "collector-mqtt.json").read_text())
        assert doc["state"] == "running" and doc["links"]["mqtt://b:1883"]["connected"] is True
        assert doc["last_read"] and doc["links"]["mqtt://b:1883"]["last_ok"]
    finally:
        status.stop()
        spool.close()
    assert json.loads((tmp_path / "status" / "collector-mqtt.json").read_text())["state"] == "stopped"


def test_the_last_logged_problem_and_a_fatal_error_are_kept(tmp_path: Path) -> None:
    import logging

    with ProcessStatus(tmp_path, "relay-writer") as status:
        logging.getLogger("flowline.relay.writer").error("InfluxDB at http://x is not reachable")
        status.write()
        doc = read_all(tmp_path)[0]
        assert doc["last_error"]["message"] == "ERROR: InfluxDB at http://x is not reachable"
        status.fail("InfluxDB refused user 'w' (401)")
    doc = read_all(tmp_path)[0]
    assert doc["state"] == "failed" and doc["last_error"]["message"] == "InfluxDB refused user 'w' (401)"
    assert verdict(doc, time.time()) == verdict(doc, time.time())  # pure
    assert not verdict(doc, time.time()).healthy


def _doc(now: float, **changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "process": "collector-mqtt", "state": "running", "updated_at": _iso(now), "interval_s": 2.0,
        "links": {"mqtt://b:1883": {"kind": "source", "connected": True, "since": _iso(now - 500)}},
    }  # fmt: skip
    doc.update(changes)
    return doc


def test_verdict_stale_disconnected_and_healthy() -> None:
    now = float(int(time.time()))  # whole seconds, as the files store them
    assert verdict(_doc(now), now).healthy
    stale = verdict(_doc(now, updated_at=_iso(now - 45)), now)
    assert not stale.healthy and "last written 45 s ago (process hung or dead?)" in stale.summary
    down = {"kind": "source", "connected": False, "since": _iso(now - 30), "connect_attempts": 4, "last_error": "boom"}
    blip = verdict(_doc(now, links={"mqtt://b:1883": down}), now)
    assert blip.healthy and "disconnected since" in blip.summary  # a 30 s blip is reported, not fatal
    down["since"] = _iso(now - 600)
    long = verdict(_doc(now, links={"mqtt://b:1883": down}), now)
    assert not long.healthy
    assert re.search(
        r"mqtt://b:1883 disconnected since \d\d:\d\d:\d\d UTC \(10 min ago\), 4 attempts: boom", long.summary
    )


def test_flowline_status_shows_and_checks_every_process(tmp_path: Path) -> None:
    now = time.time()
    folder = tmp_path / "status"
    folder.mkdir()
    down = {"kind": "sink", "connected": False, "since": _iso(now - 300), "connect_attempts": 9,
            "last_error": "connection refused (ECONNREFUSED)"}  # fmt: skip
    (folder / "relay-ot.json").write_text(
        json.dumps(_doc(now, process="relay-ot", state="degraded", links={"dmz:7443": down}))
    )
    (folder / "collector-mqtt.json").write_text(json.dumps(_doc(now)))
    (folder / "broken.json").write_text("{not json")
    runner = CliRunner()

    shown = runner.invoke(main, ["status", "--data-dir", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert "collector-mqtt RUNNING" in text and "relay-ot DEGRADED" in text
    assert "sink dmz:7443 disconnected since" in text and "9 attempts: connection refused (ECONNREFUSED)" in text
    assert "broken UNREADABLE" in text

    ok = runner.invoke(main, ["status", "--data-dir", str(tmp_path), "--check", "collector-mqtt"])
    assert (ok.exit_code, ok.output.strip()) == (0, "healthy: collector-mqtt: running")
    bad = runner.invoke(main, ["status", "--data-dir", str(tmp_path), "--check", "relay-ot"])
    assert bad.exit_code == 1 and bad.output.startswith("unhealthy: relay-ot: dmz:7443 disconnected since")
    missing = runner.invoke(main, ["status", "--data-dir", str(tmp_path), "--check", "rollup"])
    assert missing.exit_code == 1 and "no status file for 'rollup'" in missing.output
    every = runner.invoke(main, ["status", "--data-dir", str(tmp_path), "--check", "all"])
    assert every.exit_code == 1 and len(every.output.splitlines()) == 3
    as_json = runner.invoke(main, ["status", "--data-dir", str(tmp_path), "--json"])
    assert {d["process"] for d in json.loads(as_json.output)} == {"broken", "collector-mqtt", "relay-ot"}
    empty = runner.invoke(main, ["status", "--data-dir", str(tmp_path / "nothing")])
    assert "No status files under" in empty.output


def test_status_watch_redraws_until_interrupted(tmp_path: Path) -> None:
    """`--watch` on a real terminal (a pty): it redraws every interval and stops cleanly on Ctrl-C."""
    (tmp_path / "status").mkdir()
    (tmp_path / "status" / "rollup.json").write_text(json.dumps(_doc(time.time(), process="rollup", links={})))
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowline.core", "status", "--data-dir", str(tmp_path), "--watch", "--interval", "0.2"],
        stdin=follower, stdout=follower, stderr=follower, env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )  # fmt: skip
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 30
    while output.count(b"rollup") < 3 and time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if ready:
            output += os.read(leader, 65536)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
    os.close(leader)
    text = output.decode(errors="replace")
    assert text.count("rollup") >= 3, text  # redrawn, not printed once
    assert "Traceback" not in text


def test_process_names_cover_every_long_running_command() -> None:
    assert process_name(["/opt/flowline/bin/python", "/opt/flowline/bin/flowline", "collect", "mqtt", "--config",
                         "/etc/flowline/flowline.yaml"]) == "collector-mqtt"  # fmt: skip
    assert process_name(["flowline", "-v", "relay", "writer", "--config", "x"]) == "relay-writer"
    assert process_name(["flowline", "analyze", "--config", "x", "--every", "15m"]) == "analytics"
    assert process_name(["flowline", "sim", "run"]) is None


def test_sd_notify_ready_watchdog_and_status_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The systemd notify protocol over a real datagram socket, as systemd's Type=notify expects it."""
    address = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    server.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    metrics = Metrics("relay-ot", "site", "test")
    status = ProcessStatus(tmp_path, "relay-ot").watch(metrics, "sink")
    metrics.set("connected", 0, target="dmz:7443")
    status.start()
    try:
        messages = [server.recv(4096).decode() for _ in range(2)]
    finally:
        status.stop()
        server.close()
    assert messages[0] == "READY=1"
    assert messages[1].startswith("WATCHDOG=1\nSTATUS=relay-ot: dmz:7443 disconnected since")


# --- systemd units -------------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, _, value = line.partition("=")
        sections[current].append((key, value))
    return sections


HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes", "CapabilityBoundingSet": "", "User": "flowline",
}  # fmt: skip


def test_one_hardened_notify_unit_per_process() -> None:
    units = {p.stem.removeprefix("flowline-"): p for p in SYSTEMD.glob("flowline-*.service")}
    assert set(PROCESS_NAMES.values()) <= set(units)
    for name in PROCESS_NAMES.values():
        service = dict(_unit(units[name])["Service"])
        for key, value in HARDENING.items():
            assert service.get(key) == value, f"{name}: {key}={service.get(key)!r}"
        assert (service["Type"], service["NotifyAccess"], service["RestartPreventExitStatus"]) == (
            "notify",
            "main",
            "2",
        )
        assert service["WatchdogSec"] == "60s" and service["ReadWritePaths"] == "/var/lib/flowline"
        # the unit runs the command whose status file it is named after
        assert process_name(service["ExecStart"].split()) == name, service["ExecStart"]
    health = dict(_unit(SYSTEMD / "flowline-health.service")["Service"])
    assert health["ExecStart"].endswith("status --data-dir /var/lib/flowline --check all")
    assert health["PrivateNetwork"] == "yes"  # a health check that cannot open a connection anywhere


def test_units_pass_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    """Offline checks by systemd itself: unit syntax and, per service, its exposure score (0 safe - 10)."""
    if shutil.which("systemd-analyze") is None:
        unavailable("systemd-analyze not installed (scripts/bootstrap installs it)")
    flowline = shutil.which("flowline", path=str(Path(sys.executable).parent))
    assert flowline is not None
    for path in SYSTEMD.glob("flowline-*"):
        # ExecStart must name an existing executable for verify: point it at this environment's.
        (tmp_path / path.name).write_text(path.read_text().replace("/opt/flowline/bin/flowline", flowline))
    units = sorted(str(p) for p in tmp_path.glob("flowline-*"))
    verify = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    for unit in (u for u in units if u.endswith(".service")):
        security = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", "--threshold=20", unit],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
        assert score is not None, security.stdout[-500:] + security.stderr
        assert float(score.group(1)) <= 2.0, f"{unit}: exposure {score.group(1)}"


def test_systemd_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    if shutil.which("systemd-analyze") is None:
        unavailable("systemd-analyze not installed (scripts/bootstrap installs it)")
    unit = tmp_path / "flowline-broken.service"
    unit.write_text("[Service]\nExecStart=/bin/true\nNoNewPrivilege=yes\n")
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Unknown key 'NoNewPrivilege'" in verify.stderr
