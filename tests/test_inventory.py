"""The site inventory: the example site, and every class of site-file error with file and key path."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from flowline.core.cli import main as flowline
from flowline.inventory import SiteFileError, load_site
from tests.conftest import EXAMPLE_SITE

MINIMAL = """\
site: test-site
assets:
  - id: P-101
    name: Export pump A
    type: centrifugal_pump
    criticality: A
    tags:
      - name: vibration_rms
        unit: mm/s
        source: {opcua: {node: "ns=2;s=P-101.vibration_rms"}}
        alarm: {high: 4.5, basis: ISO 20816-3}
      - name: bearing_temp
        unit: degC
        source: {mqtt: {topic: plant/test-site/P-101/bearing_temp}}
        alarm: {high: 95}
  - id: K-301
    name: Compressor
    type: centrifugal_compressor
    criticality: B
    tags:
      - name: speed
        unit: rpm
        source: {opcua: {node: "ns=2;s=K-301.speed"}}
flows:
  - sender: ot-1
    assets: ["P-*", "K-*"]
"""


def test_example_site_is_complete() -> None:
    site = load_site(EXAMPLE_SITE)
    tags = site.iter_tags()
    assert site.site == "north-field"
    assert len(site.assets) >= 12
    assert len({asset.type for asset in site.assets}) >= 5
    assert len(tags) >= 60
    assert all(tag.unit for _, tag in tags)
    assert {asset.criticality.value for asset in site.assets} >= {"A", "B"}
    kinds = {tag.source.kind for _, tag in tags}
    assert kinds == {"opcua", "mqtt"}
    for asset, tag in tags:
        assert tag.alarm is not None and tag.alarm.basis, f"{asset.id}/{tag.name} lacks an alarm basis"
        assert site.is_flow_approved("ot-north-1", asset.id, tag.name)
        if tag.source.opcua is not None:
            assert tag.source.opcua.node == f"ns=2;s={asset.id}.{tag.name}"
            assert tag.source.opcua.browse_path == f"0:Objects/2:north-field/2:{asset.id}/2:{tag.name}"
        else:
            assert tag.source.mqtt is not None
            assert tag.source.mqtt.topic == f"plant/north-field/{asset.id}/{tag.name}"
    assert len(site.forecast_tags()) >= 10
    assert not site.is_flow_approved("ot-rogue", "P-101", "vibration_rms")


def test_example_site_comments_give_every_alarm_basis() -> None:
    """Each alarm's engineering basis is also in a comment right above its tag."""
    lines = EXAMPLE_SITE.read_text(encoding="utf-8").splitlines()
    checked = 0
    for index, line in enumerate(lines):
        if "basis:" in line:
            start = next(i for i in range(index, -1, -1) if "- name:" in lines[i] or "- &" in lines[i])
            assert lines[start - 1].strip().startswith("#"), f"line {start + 1}: no comment with the alarm basis"
            checked += 1
    assert checked >= 30


def _problems(tmp_path: Path, text: str) -> tuple[Path, list[str]]:
    path = tmp_path / "site.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SiteFileError) as info:
        load_site(path)
    assert str(path) in str(info.value)
    return path, info.value.problems


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("    criticality: A\n", "    criticallity: A\n", "assets[0] (P-101).criticallity: unknown key"),
        ("    criticality: B\n", "    criticality: Z\n", "assets[1] (K-301).criticality: expected"),
        (
            "alarm: {high: 95}",
            "alarm: {high: ninety-five}",
            "assets[0] (P-101).tags[1] (bearing_temp).alarm.high: expected a number",
        ),
        ("  - id: K-301\n", "  - id: P-101\n", "assets[1].id: duplicate asset id 'P-101'"),
        (
            "      - name: bearing_temp\n",
            "      - name: vibration_rms\n",
            "duplicate tag name 'vibration_rms' in asset 'P-101'",
        ),
        (
            '        source: {opcua: {node: "ns=2;s=K-301.speed"}}\n',
            "",
            "assets[1] (K-301).tags[0] (speed).source: required key is missing",
        ),
        ("    tags:\n      - name: speed", "    tags: speed\n    x:\n      - name: speed", "expected a list"),
        ('["P-*", "K-*"]', '["P-*", "X-*"]', "flows[0].assets: pattern 'X-*' matches no asset"),
        ("{high: 4.5, basis: ISO 20816-3}", "{high: 4.5, low: 9, basis: ISO 20816-3}", "low (9.0) must be below high"),
    ],
    ids=[
        "wrong-key",
        "wrong-enum",
        "non-numeric-alarm",
        "duplicate-asset",
        "duplicate-tag",
        "tag-without-source",
        "wrong-type",
        "flow-matches-nothing",
        "alarm-order",
    ],
)
def test_site_file_errors_name_file_and_key_path(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in MINIMAL
    _, problems = _problems(tmp_path, MINIMAL.replace(old, new, 1))
    assert any(expected in p for p in problems), problems


def test_source_needs_exactly_one_kind(tmp_path: Path) -> None:
    text = MINIMAL.replace('source: {opcua: {node: "ns=2;s=K-301.speed"}}', "source: {}")
    _, problems = _problems(tmp_path, text)
    assert any("assets[1] (K-301).tags[0] (speed).source" in p and "exactly one" in p for p in problems), problems


def test_all_problems_reported_together(tmp_path: Path) -> None:
    text = MINIMAL.replace("alarm: {high: 95}", "alarm: {high: hot}").replace('["P-*", "K-*"]', '["Z-*"]')
    _, problems = _problems(tmp_path, text)
    assert len(problems) == 2


def test_assets_check_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    good = runner.invoke(flowline, ["assets", "check", str(EXAMPLE_SITE)])
    assert good.exit_code == 0, good.output
    assert "OK" in good.output and "north-field" in good.output

    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(
        MINIMAL.replace("alarm: {high: 95}", "alarm: {high: hot}").replace("  - id: K-301", "  - id: P-101")
    )
    bad = runner.invoke(flowline, ["assets", "check", str(bad_file)])
    assert bad.exit_code == 1
    assert str(bad_file) in bad.output
    assert "alarm.high: expected a number" in bad.output and "duplicate asset id" in bad.output

    missing = runner.invoke(flowline, ["assets", "check", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and "cannot read file" in missing.output


def test_production_stream_must_not_mix_units(tmp_path: Path) -> None:
    speed = 'source: {opcua: {node: "ns=2;s=K-301.speed"}}'
    text = MINIMAL.replace("        alarm: {high: 95}\n", "        alarm: {high: 95}\n        production: crude\n")
    text = text.replace(speed, speed + "\n        production: crude")
    _, problems = _problems(tmp_path, text)
    assert any("production stream 'crude' mixes units degC, rpm" in p for p in problems), problems


def test_example_site_production_streams() -> None:
    streams = load_site(EXAMPLE_SITE).production_streams()
    assert {stream: [(a.id, t.name, t.unit) for a, t in tags] for stream, tags in streams.items()} == {
        "crude export": [("P-101", "flow", "m3/h"), ("P-102", "flow", "m3/h")],
        "gas": [("V-201", "gas_flow", "Sm3/h")],
    }


def test_assets_check_warns_about_blocked_assets_and_sources_read_twice(tmp_path: Path) -> None:
    text = (
        MINIMAL.replace('assets: ["P-*", "K-*"]', 'assets: ["P-*"]\n    tags: [vibration_rms]')
        .replace("plant/test-site/P-101/bearing_temp", "plant/shared")
        .replace(
            "    tags:\n      - name: speed",
            "    tags:\n      - name: speed2\n        source: {mqtt: {topic: plant/shared}}\n      - name: speed",
        )
    )
    path = tmp_path / "site.yaml"
    path.write_text(text)
    result = CliRunner().invoke(flowline, ["assets", "check", str(path)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "WARNING" in line]
    assert len(warnings) == 3, result.output
    assert "assets[0] (P-101): no approved flow lets tags bearing_temp through" in warnings[0]
    assert "assets[1] (K-301): no approved flow lets its points through" in warnings[1]
    assert (
        "assets[1] (K-301).tags[0] (speed2) and assets[0] (P-101).tags[1] (bearing_temp) are mapped to the same"
        " source (mqtt plant/shared)" in warnings[2]
    )
    clean = CliRunner().invoke(flowline, ["assets", "check", str(EXAMPLE_SITE)])
    assert "WARNING" not in clean.output
