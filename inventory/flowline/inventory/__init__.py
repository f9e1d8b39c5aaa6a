"""The asset inventory: assets, tags, sources, alarm limits, criticality, zones and approved flows.

You can't protect, or maintain, what you don't know: every other stage looks things up here.
"""

from flowline.inventory.loader import SiteFileError, load_site, parse_site
from flowline.inventory.model import (
    Alarm,
    Asset,
    Consequence,
    Criticality,
    Flow,
    MqttSource,
    OpcUaSource,
    Site,
    SparkplugSource,
    Tag,
    Zone,
)

__all__ = [
    "Alarm",
    "Asset",
    "Consequence",
    "Criticality",
    "Flow",
    "MqttSource",
    "OpcUaSource",
    "Site",
    "SiteFileError",
    "SparkplugSource",
    "Tag",
    "Zone",
    "load_site",
    "parse_site",
]
