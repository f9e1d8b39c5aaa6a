"""Load and validate a site file, reporting every problem with its file, key path and expectation."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from flowline.core.errors import FlowlineError
from flowline.inventory.model import Site, Tag


class SiteFileError(FlowlineError):
    """The site file is invalid. ``problems`` holds one ``path: message`` line per problem."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(
            f"{source}: {len(self.problems)} problem(s)\n" + "\n".join(f"  {source}: {p}" for p in self.problems)
        )


def load_site(path: str | Path) -> Site:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SiteFileError(str(path), [f"cannot read file: {exc.strerror}"]) from exc
    return parse_site(text, source=str(path))


def parse_site(text: str, source: str = "<site>") -> Site:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SiteFileError(source, [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from exc
    if not isinstance(raw, dict):
        raise SiteFileError(source, [f"(top level): expected a mapping with 'site' and 'assets', got {_kind(raw)}"])

    problems = _structural_problems(raw)
    try:
        site = Site.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(raw, err) for err in exc.errors()] + problems
        raise SiteFileError(source, problems) from exc
    problems += _semantic_problems(site)
    if problems:
        raise SiteFileError(source, problems)
    return site


def _structural_problems(raw: dict[str, Any]) -> list[str]:
    """Duplicate asset ids are checked on the raw data so they are reported with the model errors."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    assets = raw.get("assets")
    if isinstance(assets, list):
        for index, asset in enumerate(assets):
            if isinstance(asset, dict) and isinstance(asset.get("id"), str):
                first = seen.setdefault(asset["id"], index)
                if first != index:
                    problems.append(
                        f"assets[{index}].id: duplicate asset id {asset['id']!r} (first at assets[{first}])"
                    )
    flows = raw.get("flows")
    rules = raw.get("asset_patterns")
    # a flow may name the assets of an asset pattern: its glob matches the pattern itself ("pump-*")
    known = list(seen)
    if isinstance(rules, list):
        known += [r["pattern"] for r in rules if isinstance(r, dict) and isinstance(r.get("pattern"), str)]
    if isinstance(flows, list) and seen:
        for index, flow in enumerate(flows):
            patterns = flow.get("assets") if isinstance(flow, dict) else None
            for pattern in patterns if isinstance(patterns, list) else []:
                if isinstance(pattern, str) and not any(fnmatch.fnmatchcase(a, pattern) for a in known):
                    problems.append(f"flows[{index}].assets: pattern {pattern!r} matches no asset of the inventory")
    return problems


def _semantic_problems(site: Site) -> list[str]:
    problems: list[str] = []
    zone_ids = {zone.id for zone in site.zones}
    for index, asset in enumerate(site.assets):
        if asset.zone is not None and zone_ids and asset.zone not in zone_ids:
            problems.append(
                f"assets[{index}] ({asset.id}).zone: unknown zone {asset.zone!r}, expected one of {sorted(zone_ids)}"
            )
    for index, rule in enumerate(site.asset_patterns):
        where = f"asset_patterns[{index}] ({rule.pattern})"
        if rule.type not in site.asset_types:
            problems.append(
                f"{where}.type: unknown asset type {rule.type!r}, expected one of {sorted(site.asset_types)}"
            )
        if rule.zone is not None and zone_ids and rule.zone not in zone_ids:
            problems.append(f"{where}.zone: unknown zone {rule.zone!r}, expected one of {sorted(zone_ids)}")
        if "/" in rule.pattern or "+" in rule.pattern or "#" in rule.pattern:
            problems.append(f"{where}.pattern: an asset id is one MQTT topic level: no '/', '+' or '#'")
    return problems


def _describe(raw: Any, err: Any) -> str:
    """Turn a pydantic error into 'assets[3] (P-101).tags[0].alarm.high: expected a number, got "x"'."""
    path = ""
    node = raw
    for part in err["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            label = node.get("id", node.get("name")) if isinstance(node, dict) else None
            if isinstance(label, str):
                path += f" ({label})"
        else:
            if part in {"function-after[_exactly_one(), Source]"}:
                continue
            path += f".{part}" if path else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return f"{path or '(top level)'}: {_expectation(err)}"


_EXPECTED = {
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "int_parsing": "expected a whole number",
    "string_type": "expected a text value",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "missing": "required key is missing",
    "extra_forbidden": "unknown key (check the spelling against DESIGN.md's site file)",
    "literal_error": "expected one of the allowed values",
    "enum": "expected one of the allowed values",
    "too_short": "expected at least one entry",
    "string_too_short": "expected a non-empty text value",
}


def _expectation(err: Any) -> str:
    kind = err["type"]
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    expected = str(_EXPECTED.get(kind, err["msg"]))
    if kind in {"literal_error", "enum"}:
        expected = str(err["msg"]).replace("Input should be", "expected")
    if kind == "missing":
        return expected
    return f"{expected}, got {_kind(err.get('input'))}"


def _kind(value: Any) -> str:
    if isinstance(value, dict | list):
        return type(value).__name__
    return repr(value)[:60]


def _source_key(tag: Tag) -> tuple[str, ...]:
    source = tag.source
    if source.opcua is not None:
        return ("opcua", source.opcua.server, source.opcua.node or f"browse_path {source.opcua.browse_path}")
    if source.mqtt is not None:
        return ("mqtt", source.mqtt.topic, source.mqtt.json_key or "")
    assert source.sparkplug is not None
    sp = source.sparkplug
    return ("sparkplug", sp.group, sp.edge_node, sp.device or "", sp.metric)


def site_warnings(site: Site) -> list[str]:
    """What is valid but probably wrong: points no approved flow lets through, one source read twice."""
    warnings: list[str] = []
    for index, asset in enumerate(site.assets):
        blocked = [tag.name for tag in asset.tags if not any(f.allows(asset.id, tag.name) for f in site.flows)]
        if len(blocked) == len(asset.tags):
            warnings.append(
                f"assets[{index}] ({asset.id}): no approved flow lets its points through; the DMZ gateway "
                "will refuse them all (add the asset to a flow's 'assets', or remove it)"
            )
        elif blocked:
            warnings.append(
                f"assets[{index}] ({asset.id}): no approved flow lets tags {', '.join(blocked)} through; the "
                "DMZ gateway will refuse their points"
            )
    first: dict[tuple[str, ...], str] = {}
    for a_index, asset in enumerate(site.assets):
        for t_index, tag in enumerate(asset.tags):
            where = f"assets[{a_index}] ({asset.id}).tags[{t_index}] ({tag.name})"
            key = _source_key(tag)
            if key in first:
                warnings.append(
                    f"{where} and {first[key]} are mapped to the same source ({' '.join(k for k in key if k)}): "
                    "every value would be stored twice, under two names"
                )
            else:
                first[key] = where
    return warnings
