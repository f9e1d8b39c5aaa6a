"""The collectors refuse to start, naming library and version, when an internal they rely on is gone."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from asyncua.common.subscription import Subscription

from flowline.collectors.compat import check_asyncua, check_paho
from flowline.core.errors import DependencyError


def test_installed_versions_pass() -> None:
    check_paho()
    check_asyncua()


def test_missing_paho_internal_is_named_with_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(mqtt.Client, "_packet_read")
    with pytest.raises(DependencyError) as refused:
        check_paho()
    assert str(refused.value).startswith(f"paho-mqtt {version('paho-mqtt')} lacks _packet_read")
    assert "MQTT collector's fast receive path" in str(refused.value)


def test_missing_asyncua_internal_is_named_with_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(Subscription, "_deliver")
    with pytest.raises(DependencyError, match=rf"asyncua {version('asyncua')} lacks _deliver"):
        check_asyncua()


def test_collect_mqtt_refuses_to_start_with_a_clear_line(tmp_path: Path) -> None:
    """The real command, in a process whose paho lacks an internal: one line, exit 1, no traceback."""
    probe = (
        "import paho.mqtt.client as m\n"
        "del m.Client._sock_recv\n"
        "from flowline.core.cli import main\n"
        f"main(['collect', 'mqtt', '--config', '{tmp_path / 'absent.yaml'}'])\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert run.returncode == 1
    assert f"Error: paho-mqtt {version('paho-mqtt')} lacks _sock_recv" in run.stderr
    assert "Traceback" not in run.stderr
