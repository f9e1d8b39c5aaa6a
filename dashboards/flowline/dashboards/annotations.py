"""Optional: copy flag changes (the ``events`` measurement) into Grafana as annotations.

Off by default. The Reliability dashboard already shows flag changes through an InfluxQL annotation
query, which needs no write access to Grafana. Pushing them as Grafana annotations is for sites
that want them on every dashboard (Grafana's built-in annotation layer), in Grafana's annotation
API for other tools, or kept after InfluxDB's retention has dropped the raw events. Pushing is
idempotent: a change already annotated (same time and text) is not added again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grafana_client.api import GrafanaApi

from flowline.historian.query import HistorianReader

ANNOTATION_TAGS = ("flowline", "flag-change")
NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class FlagChange:
    time_ms: int
    asset: str
    tag: str
    kind: str
    flag: str
    title: str
    text: str

    @property
    def body(self) -> str:
        return f"{self.title}\n{self.text}"

    def tags(self) -> list[str]:
        return [*ANNOTATION_TAGS, self.kind, f"asset:{self.asset}", f"tag:{self.tag}", f"flag:{self.flag}"]


def read_flag_changes(reader: HistorianReader, since_ns: int, site: str | None = None) -> list[FlagChange]:
    """Flag changes written by analytics since ``since_ns`` (optionally for one site), oldest first."""
    query = 'SELECT "title", "text", "flag" FROM "events" WHERE time >= $since'
    params: dict[str, object] = {"since": since_ns}
    if site is not None:
        query += ' AND "site" = $site'
        params["site"] = site
    query += ' GROUP BY "asset", "tag", "kind"'
    changes = []
    for series in reader.query(query, params):
        for row in series.values:
            record = dict(zip(series.columns, row, strict=True))
            changes.append(
                FlagChange(
                    time_ms=int(record["time"]) // NS_PER_MS,
                    asset=series.tags.get("asset", ""),
                    tag=series.tags.get("tag", ""),
                    kind=series.tags.get("kind", ""),
                    flag=str(record["flag"]),
                    title=str(record["title"]),
                    text=str(record["text"]),
                )
            )
    return sorted(changes, key=lambda c: c.time_ms)


def push_flag_changes(api: GrafanaApi, changes: Sequence[FlagChange], dashboard_uid: str) -> tuple[int, int]:
    """Add an annotation per change not yet in Grafana; returns (added, already there)."""
    if not changes:
        return 0, 0
    params = {
        "from": changes[0].time_ms,
        "to": changes[-1].time_ms,
        "tags": list(ANNOTATION_TAGS),
        "dashboardUID": dashboard_uid,
        "limit": 100_000,
    }
    existing: list[dict[str, Any]] = api.client.GET("/annotations", params=params)
    seen = {(int(a.get("time", 0)), a.get("text", "")) for a in existing}
    added = 0
    for change in changes:
        if (change.time_ms, change.body) in seen:
            continue
        # grafana-client's add_annotation sends null panelId/timeEnd; post only the fields we mean.
        api.client.POST(
            "/annotations",
            json={"dashboardUID": dashboard_uid, "time": change.time_ms, "tags": change.tags(), "text": change.body},
        )
        seen.add((change.time_ms, change.body))
        added += 1
    return added, len(changes) - added
