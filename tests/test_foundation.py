"""Config, secrets, metrics and the local-service launchers (real influxd and mosquitto)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests

from flowline.core.config import load_config
from flowline.core.errors import ConfigError
from flowline.core.metrics import Metrics, MetricsReporter
from flowline.core.points import Point
from flowline.core.secrets import SecretError, SecretRef
from flowline.lab.services import InfluxDServer, InfluxUser, MosquittoServer, wait_until

from .conftest import EXAMPLE_SITE, MQTT_PASSWORD, MQTT_USER


def test_config_resolves_paths_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    config_file = tmp_path / "conf" / "flowline.yaml"
    config_file.write_text(
        f"site_file: {EXAMPLE_SITE}\n"
        "data_dir: ../state\n"
        "historian: {url: 'http://127.0.0.1:1', password: {file: secrets/influx}}\n"
    )
    config = load_config(config_file)
    assert config.data_dir == (tmp_path / "state").resolve()
    assert config.spool_dir("mqtt") == (tmp_path / "state" / "spool" / "mqtt").resolve()
    assert config.historian is not None and config.historian.password is not None
    assert config.historian.password.file == (tmp_path / "conf" / "secrets" / "influx").resolve()


def test_config_errors_name_the_file_and_key(tmp_path: Path) -> None:
    config_file = tmp_path / "flowline.yaml"
    config_file.write_text("site_file: x.yaml\nhistorian: {batch_max_points: -3, colour: red}\n")
    with pytest.raises(ConfigError) as error:
        load_config(config_file)
    text = str(error.value)
    assert str(config_file) in text
    assert "historian.batch_max_points" in text
    assert "historian.colour" in text


def test_inline_secret_is_not_accepted(tmp_path: Path) -> None:
    config_file = tmp_path / "flowline.yaml"
    config_file.write_text("site_file: x.yaml\nhistorian: {password: hunter2}\n")
    with pytest.raises(ConfigError, match=r"historian\.password"):
        load_config(config_file)


def test_secret_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWLINE_TEST_SECRET", "s3cret")
    assert SecretRef(env="FLOWLINE_TEST_SECRET").read() == "s3cret"
    secret_file = tmp_path / "token"
    secret_file.write_text("abc\n")
    assert SecretRef(file=secret_file).read() == "abc"
    with pytest.raises(SecretError, match="FLOWLINE_MISSING"):
        SecretRef(env="FLOWLINE_MISSING").read()
    with pytest.raises(SecretError, match="cannot read secret file"):
        SecretRef(file=tmp_path / "absent").read()
    with pytest.raises(ValueError, match="exactly one"):
        SecretRef(env="A", file=secret_file)


def test_metrics_snapshot_are_points_with_stage_tags() -> None:
    metrics = Metrics("relay-ot", "north-field", "demo")
    metrics.inc("points_out_total", 5)
    metrics.inc("points_out_total", 2)
    metrics.inc("rejected_total", reason="invalid_json")
    metrics.set("spool_bytes", 1024, spool="mqtt")
    points = {(p.measurement, p.tags.get("reason", p.tags.get("spool"))): p for p in metrics.snapshot(123)}
    assert points[("flowline_points_out_total", None)].fields == {"value": 7.0}
    rejected = points[("flowline_rejected_total", "invalid_json")]
    assert rejected.tags == {
        "stage": "relay-ot",
        "site": "north-field",
        "instance": "demo",
        "reason": "invalid_json",
    }
    assert points[("flowline_spool_bytes", "mqtt")].timestamp_ns == 123
    assert metrics.total("rejected_total") == 1


def test_metrics_reporter_flushes_periodically_and_survives_sink_errors() -> None:
    metrics = Metrics("sim", "s", "i")
    metrics.inc("points_in_total")
    batches: list[list[Point]] = []
    calls = {"n": 0}

    def sink(points: list[Point]) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("disk full")
        batches.append(points)

    reporter = MetricsReporter(metrics, sink, interval_s=0.05).start()
    wait_until(lambda: len(batches) >= 2, 10, "two metric flushes")
    reporter.stop()
    assert metrics.counter("metrics_report_errors_total", error="OSError") == 1
    assert any(p.measurement == "flowline_points_in_total" for p in batches[0])


def test_influxd_fixture_enforces_least_privilege(influx: InfluxDServer, influx_db: str) -> None:
    influx.create_user(InfluxUser("w_only", "pw-w", grants=((influx_db, "WRITE"),)))
    write = requests.post(
        f"{influx.url}/write", params={"db": influx_db}, data=b"m v=1 1\n", auth=("w_only", "pw-w"), timeout=5
    )
    assert write.status_code == 204
    read = requests.get(
        f"{influx.url}/query",
        params={"db": influx_db, "q": "SELECT * FROM m"},
        auth=("w_only", "pw-w"),
        timeout=5,
    )
    assert read.status_code == 403 or "error" in read.text
    anonymous = requests.post(f"{influx.url}/write", params={"db": influx_db}, data=b"m v=1 1\n", timeout=5)
    assert anonymous.status_code == 401


def test_influxd_binds_only_loopback_and_restarts_with_data(tmp_path: Path) -> None:
    server = InfluxDServer(tmp_path / "db", auth=False)
    with server:
        config = (tmp_path / "db" / "influxdb.conf").read_text()
        assert f'bind-address = "127.0.0.1:{server.rpc_port}"' in config
        server.create_database("d")
        requests.post(
            f"{server.url}/write", params={"db": "d"}, data=b"m v=1 1\n", timeout=5
        ).raise_for_status()
        server.restart()
        result = server.query("SELECT count(v) FROM m", db="d")
        assert result["results"][0]["series"][0]["values"][0][1] == 1  # type: ignore[index]


def test_mosquitto_fixture_requires_password_and_serves_tls(mosquitto: MosquittoServer, pki) -> None:  # type: ignore[no-untyped-def]
    base = ["mosquitto_pub", "-h", "127.0.0.1", "-t", "t/x", "-m", "1", "-q", "1"]
    tls = subprocess.run(
        [
            *base,
            "-p",
            str(mosquitto.tls_port),
            "--cafile",
            str(pki.files.cert),
            "-u",
            MQTT_USER,
            "-P",
            MQTT_PASSWORD,
        ],
        capture_output=True,
        timeout=20,
    )
    assert tls.returncode == 0, tls.stderr
    wrong = subprocess.run(
        [*base, "-p", str(mosquitto.port), "-u", MQTT_USER, "-P", "wrong"], capture_output=True, timeout=20
    )
    assert wrong.returncode != 0
