"""`flowline stack status|down` on a kept stack's state file, with real processes: what is shown,
what is stopped (and only that: a recycled pid running something else is left alone), SIGKILL for
a process that ignores SIGTERM, and `flowline demo` refusing to wipe a folder whose stack runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowline.lab.stack import STATE_FILE, KeptStack

SLEEPER = (
    "import signal, sys, time\n"
    "if sys.argv[1] == 'stubborn': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)"
)


@pytest.fixture
def kept(tmp_path: Path) -> Iterator[tuple[Path, dict[str, subprocess.Popen[bytes]]]]:
    workdir = tmp_path / ".flowline-demo"
    workdir.mkdir()
    (workdir / ".flowline-demo").write_text("marker")
    procs = {
        name: subprocess.Popen([sys.executable, "-c", SLEEPER, name], start_new_session=True, stdout=subprocess.PIPE)
        for name in ("influxd", "stubborn", "collect-mqtt")
    }
    for proc in procs.values():
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"  # its SIGTERM handling is set
    entries = []
    for name, proc in procs.items():
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        entries.append({"name": name, "pid": proc.pid, "cmdline": [c.decode() for c in cmdline if c]})
    # A recycled pid: this test process, recorded with another command line.
    entries.append({"name": "relay-ot", "pid": os.getpid(), "cmdline": ["/usr/bin/something-else"]})
    state = {"config": str(workdir / "flowline.yaml"), "influx_url": "http://127.0.0.1:9", "processes": entries}
    (workdir / STATE_FILE).write_text(json.dumps(state))
    yield workdir, procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _flowline(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowline.core", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_status_shows_each_process_and_a_demo_run_will_not_wipe_a_running_stack(
    kept: tuple[Path, dict[str, subprocess.Popen[bytes]]],
) -> None:
    workdir, procs = kept
    status = _flowline(["stack", "status"], workdir.parent)
    assert status.returncode == 1  # relay-ot is "down": its pid now runs another program
    assert status.stdout.count("running") == 3 and "stopped" in status.stdout
    assert "InfluxDB: http://127.0.0.1:9 (unreachable)" in status.stdout
    assert "not running: relay-ot; restart with 'flowline stack down --workdir .flowline-demo'" in status.stderr

    demo = _flowline(["demo", "--workdir", str(workdir)], workdir.parent)
    assert demo.returncode == 2
    assert "a demo stack is still running in" in demo.stderr and "flowline stack down --workdir" in demo.stderr
    assert all(p.poll() is None for p in procs.values())


def test_down_stops_upstream_first_kills_what_ignores_sigterm_and_spares_a_recycled_pid(
    kept: tuple[Path, dict[str, subprocess.Popen[bytes]]],
) -> None:
    workdir, procs = kept
    stack = KeptStack.load(workdir)
    assert stack is not None
    assert [p.name for p in stack.running] == ["influxd", "stubborn", "collect-mqtt"]
    assert stack.stop(timeout=1.0) == ["stubborn"]
    for proc in procs.values():
        proc.wait(timeout=10)
    assert procs["influxd"].returncode == -15 and procs["collect-mqtt"].returncode == -15
    assert procs["stubborn"].returncode == -9
    assert not (workdir / STATE_FILE).exists()  # the folder is free for the next demo
    after = _flowline(["stack", "down"], workdir.parent)
    assert after.returncode == 1 and "no stack is kept running in .flowline-demo" in after.stderr
