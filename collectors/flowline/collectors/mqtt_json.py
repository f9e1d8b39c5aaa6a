"""Plain-MQTT JSON payloads and the topic -> tag mapping from the site file.

Payload shapes (each value becomes one telemetry point):

* a single value: ``21.5``, ``true``, ``"RUNNING"``;
* an object ``{"value": 21.5, "ts": 1700000000.5, "quality": "good"}``; ``ts`` in seconds,
  milliseconds (or micro/nanoseconds, told apart by magnitude) or ISO 8601; ``quality`` as
  ``good|uncertain|bad``, 0/1/2 or a raw OPC UA status code;
* an object keyed by the tag's ``json_key`` (``{"temp": 21.5, "rpm": 1480}``);
* a batch: a JSON array of any of the above.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from flowline.collectors.common import Rejected, check_finite, check_timestamp
from flowline.core.points import FieldValue, Point, Quality, TagRef, telemetry_point
from flowline.inventory import Site

_QUALITY_NAMES = {"good": Quality.GOOD, "uncertain": Quality.UNCERTAIN, "bad": Quality.BAD}


@dataclass(frozen=True)
class TopicTarget:
    ref: TagRef
    json_key: str | None


class TopicMap:
    """Exact topics from the site file, then templates such as ``plant/{site}/{asset}/{tag}``."""

    def __init__(self, site: Site, templates: list[str]) -> None:
        self.site = site
        self.exact: dict[str, list[TopicTarget]] = {}
        for asset, tag in site.iter_tags("mqtt"):
            assert tag.source.mqtt is not None
            target = TopicTarget(site.tag_ref(asset, tag), tag.source.mqtt.json_key)
            self.exact.setdefault(tag.source.mqtt.topic, []).append(target)
        self.templates = [(t, _template_regex(t)) for t in templates]

    def subscriptions(self) -> list[str]:
        """Topic filters to subscribe: every exact topic plus a wildcard per template."""
        filters = [_template_filter(t) for t, _ in self.templates]
        covered = [re for _, re in self.templates]
        filters += [topic for topic in self.exact if not any(r.fullmatch(topic) for r in covered)]
        return filters

    def resolve(self, topic: str) -> list[TopicTarget]:
        found = self.exact.get(topic)
        if found:
            return found
        for _, regex in self.templates:
            match = regex.fullmatch(topic)
            if match is None:
                continue
            groups = match.groupdict()
            if groups.get("site", self.site.site) != self.site.site:
                continue
            asset = self.site.assets_by_id.get(groups.get("asset", ""))
            tag = self.site.tag(groups.get("asset", ""), groups.get("tag", ""))
            if asset is not None and tag is not None:
                return [TopicTarget(self.site.tag_ref(asset, tag), None)]
        return []


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\w+\})", template)
    body = "".join(f"(?P<{p[1:-1]}>[^/]+)" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(body)


def _template_filter(template: str) -> str:
    return re.sub(r"\{\w+\}", "+", template)


def parse_timestamp(raw: Any) -> int:
    """Epoch s/ms/us/ns (by magnitude) or ISO 8601 -> ns; naive ISO times are UTC."""
    if isinstance(raw, bool):
        raise Rejected("wrong_type", f"timestamp {raw!r} is a boolean")
    if isinstance(raw, int | float):
        check_finite(float(raw))
        magnitude = abs(raw)
        scale = 10**9 if magnitude < 1e11 else 10**6 if magnitude < 1e14 else 10**3 if magnitude < 1e17 else 1
        # Decimal of the shortest repr: 1700000000.25 s is exactly ...250000000 ns, not ...249999872
        return int(Decimal(repr(raw)) * scale) if isinstance(raw, float) else raw * scale
    if isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError as exc:
            raise Rejected("wrong_type", f"timestamp {raw!r} is not ISO 8601") from exc
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return int(parsed.timestamp() * 1e6) * 1000
    raise Rejected("wrong_type", f"timestamp {raw!r} is neither a number nor an ISO 8601 string")


def parse_quality(raw: Any) -> tuple[Quality, int | None]:
    if isinstance(raw, str) and raw.lower() in _QUALITY_NAMES:
        return _QUALITY_NAMES[raw.lower()], None
    if isinstance(raw, int) and not isinstance(raw, bool):
        if 0 <= raw <= 2:
            return Quality(raw), None
        if 0 <= raw < 1 << 32:
            return Quality.from_status_code(raw), raw
    raise Rejected("wrong_type", f"quality {raw!r} is not good/uncertain/bad, 0-2 or a status code")


def scalar(raw: Any) -> FieldValue:
    """A JSON scalar as a field value: numbers must be finite, no nulls, objects or arrays."""
    if isinstance(raw, bool | str):
        return raw
    if isinstance(raw, int | float):
        return check_finite(float(raw))
    raise Rejected("wrong_type", f"value {json.dumps(raw)[:80]} is not a number, boolean or string")


def _reject_constant(name: str) -> float:
    raise Rejected("not_finite", f"value {name} is not a finite number")


# orjson decodes (five times faster than the standard library); the standard decoder only runs on
# payloads orjson refused, to say exactly why: NaN/Infinity are not JSON, but Python reads them.
_EXPLAINER = json.JSONDecoder(parse_constant=_reject_constant)


def _refusal(payload: bytes, orjson_error: orjson.JSONDecodeError) -> Rejected:
    try:
        _EXPLAINER.decode(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return Rejected("invalid_json", f"payload is not UTF-8: {exc}")
    except json.JSONDecodeError as exc:
        return Rejected("invalid_json", f"invalid JSON: {exc}")
    except Rejected as exc:
        return exc
    return Rejected("invalid_json", f"invalid JSON: {orjson_error}")  # e.g. a lone surrogate escape


def _sample(item: Any, target: TopicTarget, now_ns: int, window_s: float) -> Point:
    if target.json_key is not None:
        if not isinstance(item, dict) or target.json_key not in item:
            raise Rejected("wrong_type", f"object has no key {target.json_key!r}")
        item = item[target.json_key]
    ts_ns, quality, status = now_ns, Quality.GOOD, None
    if isinstance(item, dict):
        if "value" not in item:
            raise Rejected("wrong_type", "object has no 'value' key")
        if "ts" in item:
            ts_ns = check_timestamp(parse_timestamp(item["ts"]), window_s)
        if "quality" in item:
            quality, status = parse_quality(item["quality"])
        item = item["value"]
    return telemetry_point(target.ref, scalar(item), ts_ns, quality, status)


def decode_json(payload: bytes, targets: list[TopicTarget], window_s: float) -> list[Point]:
    """Points in one JSON message for its topic's targets; raise `Rejected` on the first bad value."""
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise _refusal(payload, exc) from exc
    now_ns = time.time_ns()
    items = document if isinstance(document, list) else [document]
    return [_sample(item, target, now_ns, window_s) for item in items for target in targets]
