"""OPC UA deadbands: one deadband per tag, percent deadbands without EURange, filters a server refuses."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.ua.status_codes import StatusCodes

from flowline.collectors.opcua import OpcUaCollector
from flowline.collectors.opcua_deadband import METRIC, NO_EURANGE
from flowline.inventory import SiteFileError, load_site
from flowline.lab.sim.opcua_server import SimOpcUaServer
from tests.collectors_helpers import write_config, write_site
from tests.test_collector_opcua import NONE, _opcua_section, _run, _until
from tests.test_collector_opcua_more import _seen, _server_filters, _tag

PERCENT = "ns=2;s=U-1.pct"


def _deadband_type(item_filter: Any) -> int | None:
    """A filter's deadband type as the server decoded it (asyncua's wire class, not ua.DataChangeFilter)."""
    return getattr(item_filter, "DeadbandType", None)


def test_both_deadbands_on_one_tag_is_a_site_file_problem(tmp_path: Path) -> None:
    site_file = write_site(tmp_path, [_tag("ok", deadband_abs=0.5), _tag("both", deadband_abs=1.0, deadband_pct=5.0)])
    with pytest.raises(SiteFileError) as caught:
        load_site(site_file)
    [problem] = caught.value.problems
    assert problem.startswith("assets[2] (U-1).tags[1] (both).source.opcua: "), problem
    assert "'deadband_abs'" in problem and "'deadband_pct'" in problem and "not both" in problem


async def _add_eurange(server: SimOpcUaServer, asset: str, tag: str) -> None:
    """Give a simulator variable the EURange property (HasProperty "0:EURange") an analog item has."""
    assert server._server is not None
    node_id = server.node_id(asset, tag)
    property_id = ua.NodeId(f"{node_id.Identifier!s}.EURange", node_id.NamespaceIndex)  # type: ignore[arg-type]
    await server._server.get_node(node_id).add_property(
        property_id, ua.QualifiedName("EURange", 0), ua.Range(Low=0.0, High=100.0)
    )


def test_percent_deadband_on_a_node_without_eurange_is_warned_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site_file = write_site(tmp_path, [_tag("pct", deadband_pct=10.0), _tag("ranged", deadband_pct=10.0)])
    server = SimOpcUaServer(load_site(site_file))

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        await _until(collector.sessions[0].connected.is_set, 15, "connected")
        assert collector.metrics.counter(METRIC, reason=NO_EURANGE) == 1  # only the node without EURange
        [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "EURange" in r.msg]
        assert f"U-1/pct ({PERCENT})" in warning and "U-1/ranged" not in warning, warning
        assert "deadband_abs" in warning  # says what to do
        # the filter is still requested (a server may still apply it); collection goes on either way
        filters = _server_filters(server)
        assert (
            _deadband_type(filters[PERCENT]) == _deadband_type(filters["ns=2;s=U-1.ranged"]) == ua.DeadbandType.Percent
        )
        await server.set_value("U-1", "pct", 42.5)
        await _until(lambda: 42.5 in _seen(spool, "pct"), 10, "a value of the tag")

    async def main() -> None:
        await server.start()
        await _add_eurange(server, "U-1", "ranged")
        await _run(tmp_path, server, lambda url: write_config(tmp_path, site_file, _opcua_section(url, NONE)), body)

    with caplog.at_level(logging.WARNING, logger="flowline.collectors.opcua_deadband"):
        asyncio.run(main())


def _refuse_percent_deadbands(server: SimOpcUaServer, code: int) -> None:
    """Make the simulator's asyncua server refuse percent deadband filters as a strict Part 4 server may.

    asyncua's server accepts every filter (and ignores percent deadbands); this wraps its
    CreateMonitoredItems service so items asking for one get ``code`` and the others are created as usual.
    """
    assert server._server is not None
    service = server._server.iserver.subscription_service
    create = service.create_monitored_items

    def percent(item: ua.MonitoredItemCreateRequest) -> bool:
        return _deadband_type(item.RequestedParameters.Filter) == ua.DeadbandType.Percent

    async def strict(params: ua.CreateMonitoredItemsParameters) -> list[ua.MonitoredItemCreateResult]:
        refuse = [percent(item) for item in params.ItemsToCreate]
        accepted = [item for item, no in zip(params.ItemsToCreate, refuse, strict=True) if not no]
        created = iter(await create(dataclasses.replace(params, ItemsToCreate=accepted)))
        refused = ua.MonitoredItemCreateResult(StatusCode=ua.StatusCode(ua.UInt32(code)))
        return [refused if no else next(created) for no in refuse]

    service.create_monitored_items = strict  # type: ignore[method-assign]


@pytest.mark.parametrize(
    "code",
    [
        StatusCodes.BadFilterNotAllowed,
        StatusCodes.BadMonitoredItemFilterUnsupported,
        StatusCodes.BadDeadbandFilterInvalid,
    ],
)
def test_refused_percent_deadband_is_warned_counted_and_monitored_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    tags: list[dict[str, Any]] = [_tag("pct", deadband_pct=5.0), _tag("abs", deadband_abs=1.0), _tag("plain")]
    site_file = write_site(tmp_path, tags)
    server = SimOpcUaServer(load_site(site_file))
    name = ua.StatusCode(ua.UInt32(code)).name

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        session = collector.sessions[0]
        await _until(session.connected.is_set, 15, "connected")
        assert collector.metrics.counter(METRIC, reason=name) == 1
        refusals = [r.getMessage() for r in caplog.records if "refused the deadband filter" in r.msg]
        assert len(refusals) == 1 and name in refusals[0] and f"U-1/pct ({PERCENT})" in refusals[0], refusals
        # re-created without a filter; the other items keep theirs and nothing is rejected
        filters = _server_filters(server)
        assert _deadband_type(filters[PERCENT]) is None
        assert _deadband_type(filters["ns=2;s=U-1.abs"]) == ua.DeadbandType.Absolute
        assert sorted(t.ref.tag for t in session._by_handle.values()) == ["abs", "pct", "plain"]
        assert collector.metrics.total("rejected_total") == 0
        for value in (1.0, 1.5, 1.75):  # every change arrives: no deadband applies
            await server.set_value("U-1", "pct", value)
        await _until(lambda: 1.75 in _seen(spool, "pct"), 10, "values of the tag without its filter")
        assert {1.0, 1.5} <= set(_seen(spool, "pct"))

    async def main() -> None:
        await server.start()
        _refuse_percent_deadbands(server, code)
        await _run(tmp_path, server, lambda url: write_config(tmp_path, site_file, _opcua_section(url, NONE)), body)

    with caplog.at_level(logging.WARNING, logger="flowline.collectors.opcua_deadband"):
        asyncio.run(main())
