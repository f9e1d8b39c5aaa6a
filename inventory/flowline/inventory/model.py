"""Typed model of the site file (see DESIGN.md, "Site file")."""

from __future__ import annotations

import fnmatch
from enum import StrEnum
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowline.core.points import TagRef

Rating = Literal["none", "low", "medium", "high"]
RATING_WEIGHT: dict[str, float] = {"none": 0.0, "low": 1.0, "medium": 2.0, "high": 3.0}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Criticality(StrEnum):
    A = "A"  # safety / environment critical
    B = "B"  # production critical
    C = "C"  # other


class Consequence(_Strict):
    safety: Rating = "low"
    environment: Rating = "low"
    production: Rating = "low"

    def weight(self) -> float:
        """Worst-case consequence on a 0-3 scale, used to rank risk (probability x consequence)."""
        return max(RATING_WEIGHT[self.safety], RATING_WEIGHT[self.environment], RATING_WEIGHT[self.production])


class OpcUaSource(_Strict):
    """An OPC UA variable, by node id or by browse path (re-resolved after a server restart)."""

    node: str | None = None
    browse_path: str | None = None
    server: str = "default"
    sampling_ms: float | None = Field(default=None, gt=0)
    deadband_abs: float | None = Field(default=None, ge=0)
    deadband_pct: float | None = Field(default=None, ge=0, le=100)
    poll: bool = False

    @model_validator(mode="after")
    def _node_or_path(self) -> OpcUaSource:
        if self.node is None and self.browse_path is None:
            raise ValueError("give 'node' or 'browse_path'")
        return self

    @model_validator(mode="after")
    def _one_deadband(self) -> OpcUaSource:
        # A monitored item carries one DataChangeFilter with one deadband type: both cannot apply.
        if self.deadband_abs is not None and self.deadband_pct is not None:
            raise ValueError(
                "give either 'deadband_abs' (engineering units) or 'deadband_pct' (percent of the node's "
                "EURange), not both"
            )
        return self


class MqttSource(_Strict):
    """A plain MQTT topic carrying JSON."""

    topic: str
    json_key: str | None = None


class SparkplugSource(_Strict):
    """A Sparkplug B metric, addressed by group / edge node / optional device / metric name."""

    group: str
    edge_node: str
    device: str | None = None
    metric: str


class Source(_Strict):
    opcua: OpcUaSource | None = None
    mqtt: MqttSource | None = None
    sparkplug: SparkplugSource | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [name for name in ("opcua", "mqtt", "sparkplug") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of opcua, mqtt, sparkplug (got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        if self.opcua is not None:
            return "opcua"
        return "mqtt" if self.mqtt is not None else "sparkplug"


class Alarm(_Strict):
    """Alarm limits in engineering units; ``basis`` names the standard or datasheet behind them."""

    high_high: float | None = None
    high: float | None = None
    low: float | None = None
    low_low: float | None = None
    basis: str | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Alarm:
        if self.high is not None and self.low is not None and self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.high is not None and self.high_high is not None and self.high_high < self.high:
            raise ValueError(f"high_high ({self.high_high}) must not be below high ({self.high})")
        if self.low is not None and self.low_low is not None and self.low_low > self.low:
            raise ValueError(f"low_low ({self.low_low}) must not be above low ({self.low})")
        return self


TagType = Literal["number", "boolean", "string"]


class Tag(_Strict):
    name: str = Field(min_length=1)
    # What the tag's values are; a value of another type is refused (``wrong_type``), see
    # flowline.collectors.common.check_type. Most signals are measurements, hence the default.
    type: TagType = "number"
    unit: str | None = None
    description: str | None = None
    source: Source
    alarm: Alarm | None = None
    forecast: bool = False
    # Normal operating value (datasheet design point): what a healthy signal hovers around.
    normal: float | None = None
    # Seconds between the values the source should send, for data completeness. MQTT and Sparkplug
    # publish at the sender's pace, so only the site file can say; OPC UA defaults to its sampling.
    expected_interval_s: float | None = Field(default=None, gt=0)
    # A production meter of this stream (e.g. "crude export", "gas"): the operations centre shows each
    # stream's total and its share per train or well. The stream's tags add up, so they share one unit.
    production: str | None = Field(default=None, min_length=1)


class Asset(_Strict):
    id: str = Field(min_length=1)
    name: str
    type: str
    criticality: Criticality
    consequence: Consequence = Consequence()
    zone: str | None = None
    tags: list[Tag] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_tags(self) -> Asset:
        seen: set[str] = set()
        for tag in self.tags:
            if tag.name in seen:
                raise ValueError(f"duplicate tag name {tag.name!r} in asset {self.id!r}")
            seen.add(tag.name)
        return self


class TypeTag(_Strict):
    """A tag every asset of a type has; its source comes from the rule that maps the asset (see `AssetPattern`)."""

    name: str = Field(min_length=1)
    type: TagType = "number"
    unit: str | None = None
    description: str | None = None
    alarm: Alarm | None = None
    normal: float | None = None
    expected_interval_s: float | None = Field(default=None, gt=0)


class AssetType(_Strict):
    """Tags shared by many similar devices (hundreds of identical pumps): declared once, inherited."""

    tags: list[TypeTag] = Field(min_length=1)
    description: str | None = None

    @model_validator(mode="after")
    def _unique_tags(self) -> AssetType:
        names = [t.name for t in self.tags]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate tag names {duplicates}")
        return self

    def tag(self, name: str) -> TypeTag | None:
        return next((t for t in self.tags if t.name == name), None)


class AssetPattern(_Strict):
    """Assets the site file does not list one by one: any asset id matching ``pattern`` (a glob such
    as ``pump-*``) is an asset of ``type`` with that type's tags. Only MQTT topic templates use it
    (``plant/{site}/{asset}/{tag}``): a value is accepted only when its asset id matches and its tag
    is one of the type's; the DMZ gateway still keeps only approved flows (``flows``)."""

    pattern: str = Field(min_length=1)
    type: str = Field(min_length=1)
    criticality: Criticality = Criticality.C
    zone: str | None = None


class Zone(_Strict):
    id: str
    purdue_level: float
    description: str | None = None


class Flow(_Strict):
    """An approved data flow: what one OT sender may push through the DMZ gateway."""

    sender: str = Field(min_length=1)
    assets: list[str] = Field(min_length=1)
    tags: list[str] = ["*"]
    description: str | None = None

    def allows(self, asset: str, tag: str) -> bool:
        return any(fnmatch.fnmatchcase(asset, p) for p in self.assets) and any(
            fnmatch.fnmatchcase(tag, p) for p in self.tags
        )


class Site(_Strict):
    site: str = Field(min_length=1)
    description: str | None = None
    zones: list[Zone] = []
    assets: list[Asset] = Field(min_length=1)
    flows: list[Flow] = []
    asset_types: dict[str, AssetType] = {}
    asset_patterns: list[AssetPattern] = []

    def pattern_tag_ref(self, asset_id: str, tag_name: str) -> TagRef | None:
        """The site tag of an asset known only by an `AssetPattern` (first matching pattern), or None.

        Listed assets win: an id in ``assets`` is never matched by a pattern.
        """
        if asset_id in self.assets_by_id:
            return None
        for rule in self.asset_patterns:
            if fnmatch.fnmatchcase(asset_id, rule.pattern):
                tag = self.asset_types[rule.type].tag(tag_name)
                if tag is None:
                    return None
                return TagRef(self.site, asset_id, tag.name, tag.unit, value_type=tag.type)
        return None

    @model_validator(mode="after")
    def _one_unit_per_stream(self) -> Site:
        units: dict[str, set[str]] = {}
        for asset in self.assets:
            for tag in asset.tags:
                if tag.production is not None:
                    units.setdefault(tag.production, set()).add(tag.unit or "")
        for stream, found in units.items():
            if len(found) > 1:
                raise ValueError(
                    f"production stream {stream!r} mixes units {', '.join(sorted(found))}: its tags are added "
                    "up, so give them one unit (or split the stream)"
                )
        return self

    def production_streams(self) -> dict[str, list[tuple[Asset, Tag]]]:
        """``{stream: [(asset, tag), ...]}`` in site-file order, for production totals per stream."""
        streams: dict[str, list[tuple[Asset, Tag]]] = {}
        for asset, tag in self.iter_tags():
            if tag.production is not None:
                streams.setdefault(tag.production, []).append((asset, tag))
        return streams

    @cached_property
    def assets_by_id(self) -> dict[str, Asset]:
        return {asset.id: asset for asset in self.assets}

    def tag(self, asset_id: str, tag_name: str) -> Tag | None:
        asset = self.assets_by_id.get(asset_id)
        if asset is None:
            return None
        return next((t for t in asset.tags if t.name == tag_name), None)

    def tag_ref(self, asset: Asset, tag: Tag) -> TagRef:
        return TagRef(site=self.site, asset=asset.id, tag=tag.name, unit=tag.unit, value_type=tag.type)

    def iter_tags(self, kind: str | None = None) -> list[tuple[Asset, Tag]]:
        """All (asset, tag) pairs, optionally only those whose source is ``kind``."""
        return [(asset, tag) for asset in self.assets for tag in asset.tags if kind is None or tag.source.kind == kind]

    def is_flow_approved(self, sender: str, asset: str, tag: str) -> bool:
        return any(flow.sender == sender and flow.allows(asset, tag) for flow in self.flows)

    def forecast_tags(self) -> list[tuple[Asset, Tag]]:
        """Tags the analytics job assesses: marked ``forecast``, or alarm-limited on a criticality-A asset."""
        return [
            (asset, tag)
            for asset, tag in self.iter_tags()
            if tag.forecast or (asset.criticality is Criticality.A and tag.alarm is not None)
        ]
