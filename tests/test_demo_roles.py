"""The demo's InfluxDB, set up like a site's: each role's account can do what its stage needs and
nothing more, and the rollup job runs with its own account so the 90-day panel has data."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from flowline.core.points import TagRef, encode_lines, telemetry_point
from flowline.historian.cli import historian
from flowline.historian.setup import ROLES
from flowline.lab.stack import DATABASE, INFLUX_ACCOUNTS, LocalStack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    local = LocalStack(tmp_path_factory.mktemp("demo-roles"))
    local.prepare()
    local.start_services()
    local.write_config()
    yield local
    local.stop()


def _as(stack: LocalStack, role: str) -> tuple[str, str]:
    return INFLUX_ACCOUNTS[role], stack.passwords[f"influx-{role}"]


def _can_read(stack: LocalStack, role: str, source: str = '"telemetry"') -> bool:
    response = requests.get(
        f"{stack.influx.url}/query",
        params={"db": DATABASE, "q": f"SELECT count(*) FROM {source}"},
        auth=_as(stack, role),
        timeout=10,
    )
    ok = response.status_code == 200 and "error" not in response.json()["results"][0]
    return ok


def _can_write(stack: LocalStack, role: str) -> bool:
    point = telemetry_point(TagRef("north-field", "X-0", "probe", "m3/h"), 450.0, time.time_ns())
    response = requests.post(
        f"{stack.influx.url}/write",
        params={"db": DATABASE},
        data=encode_lines([point]),
        auth=_as(stack, role),
        timeout=10,
    )
    return response.status_code == 204


def test_every_role_has_exactly_the_rights_its_stage_needs(stack: LocalStack) -> None:
    assert set(INFLUX_ACCOUNTS) == set(ROLES)
    rights = {role: (_can_read(stack, role), _can_write(stack, role)) for role in ROLES}
    assert rights == {
        "writer": (False, True),  # the DMZ writer: writes telemetry, cannot read anything back
        "rollup": (True, True),  # reads raw telemetry, writes the rollup tiers
        "analytics": (True, True),  # reads history, writes asset_health/forecast/events/inventory
        "grafana": (True, False),  # reads everything, writes nothing
    }


def test_rollup_runs_with_its_own_account_and_the_hourly_tier_is_readable_by_grafana(stack: LocalStack) -> None:
    now = time.time_ns()
    hours = 3
    points = [
        telemetry_point(TagRef("north-field", "P-101", "flow", "m3/h"), 440.0 + i % 20, now - i * 60 * 10**9)
        for i in range(hours * 60)
    ]
    response = requests.post(
        f"{stack.influx.url}/write",
        params={"db": DATABASE},
        data=encode_lines(points),
        auth=_as(stack, "writer"),
        timeout=30,
    )
    assert response.status_code == 204, response.text
    # As the demo runs it: the hourly tier only.
    args = ["rollup", "--config", str(stack.config_path), "--once", "--tier", "1h"]
    result = CliRunner().invoke(historian, args)
    assert result.exit_code == 0, result.output
    assert "1h:" in result.output and "points written" in result.output and "1m:" not in result.output
    assert _can_read(stack, "grafana", '"rollup_1h"."telemetry_1h"')
    rows = requests.get(
        f"{stack.influx.url}/query",
        params={"db": DATABASE, "q": 'SELECT count("mean") FROM "rollup_1h"."telemetry_1h"'},
        auth=_as(stack, "grafana"),
        timeout=10,
    ).json()["results"][0]["series"][0]["values"]
    assert rows[0][1] >= hours - 1  # whole hours only


def test_rollup_with_the_writer_account_is_refused_with_a_clear_message(stack: LocalStack, tmp_path: Path) -> None:
    text = stack.config_path.read_text()
    bare = tmp_path / "writer-only.yaml"
    # Without the rollup section, and with a fresh checkpoint so the job has to read raw data.
    own_data = text.replace(str(stack.data_dir), str(tmp_path / "data"))
    bare.write_text(own_data.split("\nrollup:")[0] + "\n")
    result = CliRunner().invoke(historian, ["rollup", "--config", str(bare), "--once"])
    assert result.exit_code == 1
    assert "flowline_writer" in result.output and "not allowed" in result.output
    assert "Traceback" not in result.output
