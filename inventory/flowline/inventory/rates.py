"""How often each tag should send a value: what completeness, freshness and the silent-tag alert
compare against. Lives with the inventory because every IT component needs the same answer."""

from __future__ import annotations

from flowline.core.config import OpcUaCollectorConfig
from flowline.inventory.model import Tag


def opcua_default_interval_ms(opcua: OpcUaCollectorConfig | None) -> float:
    """The OPC UA collector's sampling interval for tags without ``sampling_ms``; 0 ("as fast as the
    server samples") is bounded in practice by the publishing interval, so that is used instead."""
    if opcua is None:
        defaults = OpcUaCollectorConfig.model_fields
        sampling, publishing = defaults["sampling_interval_ms"].default, defaults["publishing_interval_ms"].default
    else:
        sampling, publishing = opcua.sampling_interval_ms, opcua.publishing_interval_ms
    return float(sampling or publishing)


def expected_per_hour(tag: Tag, opcua_interval_ms: float) -> float | None:
    """Values per hour the tag should deliver, or None when nothing says (MQTT/Sparkplug without
    ``expected_interval_s``). A deadband makes this an upper bound: unchanged values are not sent."""
    if tag.expected_interval_s is not None:
        return 3600.0 / tag.expected_interval_s
    source = tag.source.opcua
    if source is None:
        return None
    return 3_600_000.0 / (source.sampling_ms or opcua_interval_ms)
