"""Per-zone installs: an OT host gets the collectors and the OT sender, and nothing of IT.

A fresh environment is built from this repository exactly as an OT host would install it (the
lock file, the `ot` extra, wheels rather than editable links, no development tools), then its own
`flowline collect mqtt` and `flowline relay ot` carry real MQTT messages through the real Mosquitto
to a DMZ gateway, and the IT libraries are shown not to be importable there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from flowline.lab.pki import CertificateAuthority
from flowline.lab.services import MosquittoServer, wait_until
from tests.conftest import MQTT_PASSWORD, MQTT_USER, REPO
from tests.relay_helpers import RelayRig, dmz_points

# What an OT host must not have (IEC 62443-3-3 SR 7.7, least functionality).
IT_LIBRARIES = ("pandas", "numpy", "statsmodels", "scipy", "matplotlib", "dask", "grafana_client", "influxdb_client")


def uv() -> str:
    found = shutil.which("uv") or str(REPO / ".uv" / "bin" / "uv")
    if not Path(found).exists():
        pytest.fail("uv not found: run scripts/bootstrap (it installs uv into .uv/)")
    return found


@pytest.fixture(scope="module")
def ot_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = tmp_path_factory.mktemp("ot-host") / "venv"
    subprocess.run(
        [uv(), "sync", "--frozen", "--no-default-groups", "--extra", "ot", "--no-editable", "--quiet"],
        cwd=REPO,
        env={**os.environ, "UV_PROJECT_ENVIRONMENT": str(env), "UV_PYTHON_DOWNLOADS": "never"},
        check=True,
        timeout=300,
    )
    return env


def test_ot_environment_holds_no_it_library(ot_env: Path) -> None:
    python = str(ot_env / "bin" / "python")
    probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m) is not None])"
    found = subprocess.run([python, "-c", probe, *IT_LIBRARIES], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"
    present = subprocess.run(
        [python, "-c", probe, "asyncua", "paho", "flowline.collectors", "flowline.relay.ot"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert present.stdout.strip() == "['asyncua', 'paho', 'flowline.collectors', 'flowline.relay.ot']"


def test_ot_command_lists_other_zones_commands_as_not_installed(ot_env: Path) -> None:
    flowline = str(ot_env / "bin" / "flowline")
    listing = subprocess.run([flowline, "--help"], capture_output=True, text=True, check=True).stdout
    commands, absent = listing.split("Not installed on this host", 1)
    assert "collect" in commands and "relay" in commands and "analyze" not in commands
    assert "analyze" in absent and "flowline-plant-analytics (IT)" in absent
    refused = subprocess.run([flowline, "analyze", "--config", "x.yaml"], capture_output=True, text=True)
    assert refused.returncode == 1
    assert "'analyze' belongs to flowline-plant-analytics, which is not installed" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.fixture
def rig(tmp_path: Path, pki: CertificateAuthority) -> Iterator[RelayRig]:
    rig = RelayRig(tmp_path / "relay", pki)
    yield rig
    rig.stop_all()


def test_ot_environment_collects_mqtt_and_sends_it_to_the_gateway(
    ot_env: Path, rig: RelayRig, mosquitto: MosquittoServer, pki: CertificateAuthority
) -> None:
    doc = yaml.safe_load(rig.write_ot_config(spools=["mqtt"]).read_text())
    (rig.root / "mqtt.pw").write_text(MQTT_PASSWORD)
    doc["collectors"] = {
        "mqtt": {
            "broker": {
                "host": "127.0.0.1",
                "port": mosquitto.tls_port,
                "tls": {"ca_file": str(pki.files.cert), "server_name": "localhost"},
                "username": MQTT_USER,
                "password": {"file": str(rig.root / "mqtt.pw")},
                "client_id": "ot-env-collector",
            },
            "batch_max_latency_ms": 20,
        }
    }
    ot_yaml = rig.root / "ot-env.yaml"
    ot_yaml.write_text(yaml.safe_dump(doc))
    rig.start_gateway()  # the DMZ end, from the development environment
    procs = []
    for command in (["collect", "mqtt"], ["relay", "ot"]):
        argv = [str(ot_env / "bin" / "flowline"), *command, "--config", str(ot_yaml)]
        with open(rig.root / f"ot-env-{command[0]}.log", "wb") as log:  # the child keeps its own copy
            procs.append(subprocess.Popen(argv, stdout=log, stderr=log))
    rig.procs += procs
    wait_until(lambda: b"READY" in (rig.root / "ot-env-collect.log").read_bytes(), 30, "collector ready")
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2)
    publisher.username_pw_set(MQTT_USER, MQTT_PASSWORD)
    publisher.connect("127.0.0.1", mosquitto.port)
    publisher.loop_start()
    t0 = time.time_ns() // 1_000_000

    def landed() -> list[float]:
        points = dmz_points(rig.dmz)
        return sorted(float(p.fields["value"]) for p in points if p.tags.get("tag") == "bearing_temp")

    def publish(value: float, ts_ms: int) -> None:
        payload = f'{{"value": {value}, "ts": {ts_ms}}}'
        publisher.publish("plant/P-101/bearing_temp", payload, qos=1).wait_for_publish(5)

    try:
        # A broker drops messages for a topic nobody has subscribed to yet: probe until one arrives.
        deadline = time.monotonic() + 60
        while not landed():
            assert time.monotonic() < deadline, "no probe reached the DMZ\n" + rig.logs()
            publish(-1.0, t0 - 1000)
            time.sleep(1)
        for i in range(50):
            publish(i + 0.5, t0 + i)
    finally:
        publisher.disconnect()
        publisher.loop_stop()

    wait_until(lambda: len([v for v in landed() if v >= 0]) >= 50, 45, "the OT environment's messages in the DMZ spool")
    assert [v for v in landed() if v >= 0] == [i + 0.5 for i in range(50)], rig.logs()
    assert all(p.poll() is None for p in procs), rig.logs()
