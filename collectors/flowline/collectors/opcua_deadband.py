"""OPC UA deadband filters, and what the collector does when a server cannot apply one.

A tag's ``deadband_abs`` or ``deadband_pct`` becomes the monitored item's DataChangeFilter. Per OPC UA
Part 4 (7.22.2) a percent deadband is a percentage of the node's ``EURange`` property: a node without
one cannot have it, and a server may refuse the filter (BadFilterNotAllowed, BadDeadbandFilterInvalid,
...) or, like asyncua's own server, accept it and ignore it. Either way the collector must not lose the
tag: it warns at subscribe time about percent deadbands on nodes without EURange, and re-creates items
whose filter was refused without one, so every change is collected. Both are counted in
``flowline_deadband_unapplied_total`` (docs/measurements.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError

from flowline.core.metrics import Metrics
from flowline.core.points import TagRef
from flowline.inventory import OpcUaSource

log = logging.getLogger(__name__)

METRIC = "deadband_unapplied_total"
NO_EURANGE = "no_eurange"  # the metric's `reason` when the node has no EURange property
# monitored-item create results that refuse the filter, not the node: retried without the filter
FILTER_REFUSALS = frozenset(
    {
        StatusCodes.BadFilterNotAllowed,
        StatusCodes.BadMonitoredItemFilterUnsupported,
        StatusCodes.BadMonitoredItemFilterInvalid,
        StatusCodes.BadDeadbandFilterInvalid,
    }
)
EURANGE = ua.QualifiedName("EURange", 0)
LISTED = 10  # tags named in one warning; a site with thousands of them gets a count for the rest


class DeadbandItem(Protocol):
    """What this module reads of a monitored tag (`flowline.collectors.opcua.MonitoredTag`)."""

    ref: TagRef
    source: OpcUaSource
    node_id: ua.NodeId | None


def deadband_filter(source: OpcUaSource) -> ua.DataChangeFilter | None:
    """The tag's DataChangeFilter; the site file allows at most one deadband per tag."""
    if source.deadband_abs is not None:
        kind, value = ua.DeadbandType.Absolute, source.deadband_abs
    elif source.deadband_pct is not None:
        kind, value = ua.DeadbandType.Percent, source.deadband_pct
    else:
        return None
    return ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValue, DeadbandType=kind, DeadbandValue=value)


def describe(items: Sequence[DeadbandItem]) -> str:
    """'U-1/flow (ns=2;s=U-1.flow), ... and 3 more' for a log line."""
    named = [
        f"{item.ref.asset}/{item.ref.tag} ({item.node_id.to_string() if item.node_id else '?'})"
        for item in items[:LISTED]
    ]
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return ", ".join(named) + more


async def without_eurange(client: Client, items: Sequence[DeadbandItem], per_call: int) -> list[DeadbandItem]:
    """The items asking for a percent deadband whose node has no ``HasProperty`` EURange.

    One TranslateBrowsePathsToNodeIds call per ``per_call`` nodes. A server that cannot answer is not
    an error: the filter is still requested and `refused` handles a refusal.
    """
    percent = [i for i in items if i.source.deadband_pct is not None and i.node_id is not None]
    missing: list[DeadbandItem] = []
    for start in range(0, len(percent), per_call):
        chunk = percent[start : start + per_call]
        paths = [
            ua.BrowsePath(
                StartingNode=item.node_id,
                RelativePath=ua.RelativePath(
                    Elements=[
                        ua.RelativePathElement(
                            ReferenceTypeId=ua.NodeId(ua.Int32(ObjectIds.HasProperty)),
                            IsInverse=False,  # type: ignore[arg-type]  # asyncua types it as its Boolean marker class
                            TargetName=EURANGE,
                        )
                    ]
                ),
            )
            for item in chunk
        ]
        try:
            results = await client.uaclient.translate_browsepaths_to_nodeids(paths)
        except (UaError, TimeoutError) as exc:
            log.info("cannot check EURange of %d percent-deadband nodes: %r", len(chunk), exc)
            return missing
        # BadNoMatch: the node exists but has no such property (an unknown node is rejected elsewhere)
        missing.extend(
            item
            for item, result in zip(chunk, results, strict=True)
            if result.StatusCode.value == StatusCodes.BadNoMatch
        )
    return missing


def warn_without_eurange(metrics: Metrics, server: str, items: Sequence[DeadbandItem]) -> None:
    if not items:
        return
    metrics.inc(METRIC, len(items), reason=NO_EURANGE)
    log.warning(
        "OPC UA server %s: %d tag(s) ask for a percent deadband (deadband_pct) but their node has no EURange "
        "property, which OPC UA computes the percentage of, so the deadband cannot apply: %s. Give these tags "
        "deadband_abs in engineering units instead, or have the server expose EURange on the node.",
        server, len(items), describe(items),
    )  # fmt: skip


def refused(metrics: Metrics, server: str, status: str, items: Sequence[DeadbandItem]) -> None:
    """Warn and count items whose filter the server refused (``status``: the code's name, e.g.
    BadDeadbandFilterInvalid); the caller re-creates them without it."""
    metrics.inc(METRIC, len(items), reason=status)
    log.warning(
        "OPC UA server %s refused the deadband filter of %d monitored item(s) with %s: %s. Monitoring them "
        "without a deadband, so every change is collected. A percent deadband (deadband_pct) needs server "
        "support and the node's EURange property: use deadband_abs for these tags, or remove the deadband.",
        server, len(items), status, describe(items),
    )  # fmt: skip
