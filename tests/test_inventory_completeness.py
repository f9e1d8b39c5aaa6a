"""The inventory's ``expected_per_hour``: how many values each tag should send (pure logic)."""

from __future__ import annotations

import pytest

from flowline.analytics.job import inventory_points
from flowline.core.config import OpcUaCollectorConfig, OpcUaEndpoint
from flowline.inventory import SiteFileError, parse_site
from flowline.inventory.rates import expected_per_hour, opcua_default_interval_ms

SITE = """
site: s1
assets:
  - id: A-1
    name: Pump
    type: pump
    criticality: B
    tags:
      - {name: fast, source: {opcua: {node: "ns=2;s=fast", sampling_ms: 250}}}
      - {name: default, source: {opcua: {node: "ns=2;s=default"}}}
      - {name: rtu, source: {mqtt: {topic: "p/A-1/rtu"}}, expected_interval_s: 60}
      - {name: silent, source: {mqtt: {topic: "p/A-1/silent"}}}
      - {name: slow, source: {opcua: {node: "ns=2;s=slow", sampling_ms: 250}}, expected_interval_s: 900}
"""


def _collector(sampling_ms: float, publishing_ms: float = 1000) -> OpcUaCollectorConfig:
    return OpcUaCollectorConfig(
        servers={"default": OpcUaEndpoint(url="opc.tcp://plc:4840")},
        sampling_interval_ms=sampling_ms,
        publishing_interval_ms=publishing_ms,
    )


def test_expected_rate_per_tag_from_site_file_then_sampling_then_collector_default() -> None:
    site = parse_site(SITE)
    by_name = {tag.name: tag for _, tag in site.iter_tags()}
    assert expected_per_hour(by_name["fast"], 1000) == 14_400  # the tag's own sampling_ms
    assert expected_per_hour(by_name["default"], 2000) == 1800  # the collector's default
    assert expected_per_hour(by_name["rtu"], 1000) == 60  # MQTT: only the site file can say
    assert expected_per_hour(by_name["silent"], 1000) is None  # unknown: no field, not a guess
    assert expected_per_hour(by_name["slow"], 1000) == 4  # an explicit expectation wins


def test_collector_default_interval() -> None:
    assert opcua_default_interval_ms(None) == 1000  # the collector's built-in default
    assert opcua_default_interval_ms(_collector(500)) == 500
    # 0 asks the server to sample as fast as it can: values still arrive once per publish at most.
    assert opcua_default_interval_ms(_collector(0, publishing_ms=2000)) == 2000


def test_inventory_points_carry_expected_per_hour_only_when_known() -> None:
    points = inventory_points(parse_site(SITE), 0, _collector(500))
    expected = {p.tags["tag"]: p.fields.get("expected_per_hour") for p in points}
    assert expected == {"fast": 14_400.0, "default": 7200.0, "rtu": 60.0, "silent": None, "slow": 4.0}


def test_expected_interval_must_be_positive() -> None:
    with pytest.raises(SiteFileError, match="expected_interval_s"):
        parse_site(SITE.replace("expected_interval_s: 60", "expected_interval_s: 0"))
