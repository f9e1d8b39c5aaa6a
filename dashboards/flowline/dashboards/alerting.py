"""Grafana alerting as code: alert rules, contact points and a notification policy from the site file.

The rules read the same InfluxDB measurements as the dashboards, with the same quoting (every
identifier double-quoted, so a tag key such as ``tag`` is never read as an InfluxQL keyword):

- **critical asset degrading**: a tag of a criticality-A asset (from the site file) whose newest
  assessment is DEGRADING or CRITICAL, with its hours to alarm, crossing probability and a link to
  its drill-down;
- **tag silent**: a tag that sent nothing for more than ``STALE_INTERVALS`` times its expected
  interval (the inventory's rule: ``expected_interval_s``, else the OPC UA sampling);
- **pipeline trouble**: a spool past half its capacity, end-to-end lag beyond 5 minutes, any
  security event at the DMZ gateway, any dead-lettered point.

One model serves both ways in: `alerting_file` renders Grafana's file-provisioning document
(``provisioning/alerting/*.yaml``) and `AlertingProvisioner` sends the same rules, contact points
and policy through the HTTP API (``/api/v1/provisioning/...``). Grafana types ``for`` as a
duration string ("5m") in both, although its published Swagger file says integer.

The notification policy: every Flowline rule carries ``flowline=true`` and a ``team`` label; one
route matches ``flowline=true`` and sends per team to its contact point. Through the API that route
is merged into the organisation's existing policy tree (other routes are kept); the provisioning
file replaces the tree, as Grafana's file provisioning always does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from grafana_client.api import GrafanaApi
from grafana_client.client import GrafanaClientError

from flowline.core.config import OpcUaCollectorConfig, SpoolConfig
from flowline.dashboards.builder import JSON, quote_ident
from flowline.dashboards.definitions import RELIABILITY_UID, STALE_INTERVALS
from flowline.dashboards.provision import DATASOURCE_UID, FOLDER_TITLE, FOLDER_UID, ProvisionError, ProvisionReport
from flowline.historian.query import quote_literal
from flowline.inventory import Criticality, Site
from flowline.inventory.rates import expected_per_hour, opcua_default_interval_ms

ORG_ID = 1
EXPR_UID = "__expr__"
RULE_GROUP = "flowline"
GROUP_INTERVAL_S = 60
FLOWLINE_LABEL = ("flowline", "true")
TEAMS = ("reliability", "operations")
ASSESSMENT_LOOKBACK_S = 24 * 3600  # the newest assessment of the last day (analytics runs more often)
SILENT_LOOKBACK_S = 6 * 3600  # a tag silent for longer drops out of the query: the freshness table keeps it
SPOOL_ALERT_FRACTION = 0.5
LAG_ALERT_S = 300.0
Reducer = Literal["last", "max", "min", "sum"]
Op = Literal["gt", "lt"]


def _regex_escape(value: str) -> str:
    return re.sub(r"[\\^$*+?.()|{}\[\]/-]", lambda m: "\\" + m.group(0), value)


def _site(site: str) -> str:
    return f"{quote_ident('site')} = {quote_literal(site)}"


@dataclass(frozen=True)
class Query:
    """One InfluxQL query of a rule, over ``range_s`` seconds before now (``$timeFilter``)."""

    ref_id: str
    text: str
    range_s: int
    reducer: Reducer = "last"
    # None: a series whose newest value is null reduces to NaN; a number replaces it (for templates).
    replace_null: float | None = None


@dataclass(frozen=True)
class Rule:
    uid: str
    title: str
    team: str
    severity: str
    queries: Sequence[Query]  # the first one is the condition's input
    op: Op
    threshold: float
    summary: str
    description: str
    pending: str = "0s"
    no_data: Literal["NoData", "OK", "Alerting"] = "OK"
    extra_annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def condition(self) -> str:
        return "FIRING"

    def labels(self, site: str) -> dict[str, str]:
        return {FLOWLINE_LABEL[0]: FLOWLINE_LABEL[1], "team": self.team, "severity": self.severity, "site": site}

    def annotations(self) -> dict[str, str]:
        return {"summary": self.summary, "description": self.description, **self.extra_annotations}

    def data(self) -> list[JSON]:
        """The InfluxQL queries, a reduce of each (``<ref>_LAST``, used in the templates), the threshold."""
        out: list[JSON] = []
        for q in self.queries:
            out.append(
                {
                    "refId": q.ref_id,
                    "queryType": "",
                    "relativeTimeRange": {"from": q.range_s, "to": 0},
                    "datasourceUid": DATASOURCE_UID,
                    "model": {
                        "refId": q.ref_id,
                        "datasource": {"type": "influxdb", "uid": DATASOURCE_UID},
                        "rawQuery": True,
                        "query": q.text,
                        "resultFormat": "time_series",
                        "intervalMs": 1000,
                        "maxDataPoints": 43200,
                    },
                }
            )
        for q in self.queries:
            settings: JSON = (
                {"mode": ""} if q.replace_null is None else {"mode": "replaceNN", "replaceWithValue": q.replace_null}
            )
            out.append(
                _expression(reduce_ref(q.ref_id), "reduce", expression=q.ref_id, reducer=q.reducer, settings=settings)
            )
        out.append(
            _expression(
                self.condition,
                "threshold",
                expression=reduce_ref(self.queries[0].ref_id),
                conditions=[{"evaluator": {"type": self.op, "params": [self.threshold]}}],
            )
        )
        return out

    def api_body(self, site: str, folder_uid: str = FOLDER_UID) -> JSON:
        """``ProvisionedAlertRule`` for ``/api/v1/provisioning/alert-rules``: the exported rule and where it goes."""
        rule = self.file_body(site)
        return {"uid": rule.pop("uid"), "orgID": ORG_ID, "folderUID": folder_uid, "ruleGroup": RULE_GROUP, **rule}

    def file_body(self, site: str) -> JSON:
        """``AlertRuleExport`` for a provisioning file."""
        return {
            "uid": self.uid,
            "title": self.title,
            "condition": self.condition,
            "data": self.data(),
            "noDataState": self.no_data,
            "execErrState": "Error",
            "for": self.pending,
            "labels": self.labels(site),
            "annotations": self.annotations(),
            "isPaused": False,
        }


def reduce_ref(ref_id: str) -> str:
    return f"{ref_id}_LAST"


def _expression(ref_id: str, kind: str, **model: Any) -> JSON:
    return {
        "refId": ref_id,
        "queryType": "",
        "relativeTimeRange": {"from": 0, "to": 0},
        "datasourceUid": EXPR_UID,
        "model": {"refId": ref_id, "type": kind, "datasource": {"type": EXPR_UID, "uid": EXPR_UID}, **model},
    }


# --- the rules --------------------------------------------------------------------------------------


def _newest(field_expr: str, site: Site, assets: Sequence[str]) -> str:
    """The newest assessment per critical (asset, tag) over the look-back: ``ORDER BY time DESC
    LIMIT 1`` per series. ``field_expr`` is one column, so each series is one alert instance."""
    ids = "|".join(_regex_escape(a) for a in assets)
    return (
        f"SELECT {field_expr} FROM {quote_ident('asset_health')} WHERE $timeFilter AND {_site(site.site)} "
        f"AND {quote_ident('asset')} =~ /^({ids})$/ GROUP BY {quote_ident('asset')}, {quote_ident('tag')} "
        "ORDER BY time DESC LIMIT 1"
    )


def degrading_rule(site: Site) -> Rule | None:
    critical = [a.id for a in site.assets if a.criticality is Criticality.A]
    if not critical:
        return None
    flag, hours, p_cross = (quote_ident(f) for f in ("flag_level", "hours_to_alarm", "p_cross"))
    look = ASSESSMENT_LOOKBACK_S
    link = f"/d/{RELIABILITY_UID}?var-site={site.site}&var-asset={{{{ $labels.asset }}}}&var-tag={{{{ $labels.tag }}}}"
    return Rule(
        uid=f"flowline-{site.site}-degrading"[:40],
        title=f"{site.site}: critical asset degrading",
        team="reliability",
        severity="critical",
        queries=[
            Query("FLAG", _newest(flag, site, critical), look),
            # hours_to_alarm is absent when no crossing is forecast; "+ 0 * flag_level" keeps the
            # newest row (flag_level is always written) so an older pass's hours never show.
            Query("HOURS", _newest(f"{hours} + 0 * {flag} AS {hours}", site, critical), look, replace_null=-1.0),
            Query("PCROSS", _newest(p_cross, site, critical), look),
        ],
        op="gt",
        threshold=1.5,  # flag_level 2 (DEGRADING) or 3 (CRITICAL)
        summary=(
            "{{ $labels.asset }} {{ $labels.tag }} is "
            "{{ if gt $values.FLAG_LAST.Value 2.5 }}CRITICAL{{ else }}DEGRADING{{ end }}: "
            "{{ if lt $values.HOURS_LAST.Value 0.0 }}no crossing forecast{{ else }}alarm limit in "
            '{{ printf "%.0f" $values.HOURS_LAST.Value }} h{{ end }}, '
            'P(cross in horizon) {{ printf "%.2f" $values.PCROSS_LAST.Value }}'
        ),
        description=(
            "The newest analytics assessment of a criticality-A asset's tag is DEGRADING or CRITICAL. "
            "Open the drill-down for its history, forecast band and alarm limit."
        ),
        no_data="OK",
        extra_annotations={"drilldown_url": link, "__dashboardUid__": RELIABILITY_UID},
    )


def silent_rules(
    site: Site, opcua: OpcUaCollectorConfig | None = None, intervals: float = STALE_INTERVALS
) -> list[Rule]:
    """One rule per distinct expected interval: a window of ``intervals`` x that interval."""
    default_ms = opcua_default_interval_ms(opcua)
    by_interval: dict[float, list[tuple[str, str]]] = {}
    for asset, tag in site.iter_tags():
        per_hour = expected_per_hour(tag, default_ms)
        if per_hour is not None:
            by_interval.setdefault(3600.0 / per_hour, []).append((asset.id, tag.name))
    everything = len(site.iter_tags())
    rules = []
    for interval_s, pairs in sorted(by_interval.items()):
        window = max(1, round(interval_s * intervals))
        scope = _site(site.site)
        if len(pairs) != everything:
            terms = " OR ".join(
                f"({quote_ident('asset')} = {quote_literal(a)} AND {quote_ident('tag')} = {quote_literal(t)})"
                for a, t in pairs
            )
            scope += f" AND ({terms})"
        # The two newest windows: the current one is partial, so both empty means silent for at
        # least one whole window. The look-back keeps a silent tag's series (and its alert) alive.
        text = (
            f"SELECT count({quote_ident('quality')}) FROM {quote_ident('telemetry')} WHERE $timeFilter AND {scope} "
            f"GROUP BY time({window}s), {quote_ident('asset')}, {quote_ident('tag')} fill(0) "
            "ORDER BY time DESC LIMIT 2"
        )
        rules.append(
            Rule(
                uid=f"flowline-{site.site}-silent-{window}s"[:40],
                title=f"{site.site}: tag silent for {window:g} s ({intervals:g} x its {interval_s:g} s interval)",
                team="operations",
                severity="warning",
                queries=[Query("VALUES", text, SILENT_LOOKBACK_S, reducer="max")],
                op="lt",
                threshold=0.5,
                # A window that began a moment ago may not hold its first value yet: wait one minute.
                pending="1m",
                summary="{{ $labels.asset }} {{ $labels.tag }} sent no value for more than " + f"{window:g} s",
                description=(
                    f"Expected one value every {interval_s:g} s (site file / OPC UA sampling). Check the source, "
                    "the collector and the relay; the operations centre's freshness table shows how long."
                ),
            )
        )
    return rules


def pipeline_rules(site: Site, spool: SpoolConfig | None = None) -> list[Rule]:
    limit = (spool or SpoolConfig()).max_bytes * SPOOL_ALERT_FRACTION
    scope = _site(site.site)

    def metric(fn: str, measurement: str, by: Iterable[str], range_s: int) -> str:
        groups = ", ".join(quote_ident(b) for b in by)
        return (
            f"SELECT {fn}({quote_ident('value')}) FROM {quote_ident(measurement)} WHERE $timeFilter AND {scope} "
            f"GROUP BY {groups}"
        )

    prefix = f"flowline-{site.site}"
    return [
        Rule(
            f"{prefix}-spool"[:40],
            f"{site.site}: spool filling",
            "operations",
            "warning",
            [Query("BYTES", metric("max", "flowline_spool_bytes", ("stage", "instance", "spool"), 300), 300, "max")],
            "gt",
            limit,
            "{{ $labels.stage }} spool {{ $labels.spool }} holds {{ humanize1024 $values.BYTES_LAST.Value }}B",
            f"A spool is past {SPOOL_ALERT_FRACTION:.0%} of its {limit * 2 / 2**20:.0f} MiB capacity: the next "
            "stage is down or too slow. When full, the stage refuses new data (or drops the oldest).",
            pending="5m",
        ),
        Rule(
            f"{prefix}-lag"[:40],
            f"{site.site}: end-to-end lag",
            "operations",
            "warning",
            [Query("LAG", metric("max", "flowline_lag_seconds", ("stage", "instance"), 300), 300, "max")],
            "gt",
            LAG_ALERT_S,
            "{{ $labels.stage }} {{ $labels.instance }} is {{ humanizeDuration $values.LAG_LAST.Value }} behind",
            f"Values reach InfluxDB more than {LAG_ALERT_S:g} s after they were measured.",
            pending="5m",
        ),
        Rule(
            f"{prefix}-security"[:40],
            f"{site.site}: security events at the DMZ gateway",
            "operations",
            "critical",
            [
                Query(
                    "EVENTS",
                    f"SELECT sum({quote_ident('count')}) FROM {quote_ident('security_event')} WHERE $timeFilter "
                    f"AND {scope} GROUP BY {quote_ident('reason')}",
                    900,
                    "sum",
                )
            ],
            "gt",
            0,
            "{{ $values.EVENTS_LAST.Value }} security event(s) at the DMZ gateway: {{ $labels.reason }}",
            "Unapproved flows, bad signatures, replays, bad certificates or sequence gaps in the last 15 minutes: "
            "see the Security and inventory dashboard.",
        ),
        Rule(
            f"{prefix}-dead-letters"[:40],
            f"{site.site}: dead-lettered points",
            "operations",
            "warning",
            [Query("DEAD", metric("spread", "flowline_dead_letter_total", ("stage", "instance", "reason"), 900), 900)],
            "gt",
            0,
            "{{ $labels.stage }} dead-lettered {{ $values.DEAD_LAST.Value }} point(s): {{ $labels.reason }}",
            "InfluxDB refused points in the last 15 minutes; `flowline historian dead-letter` shows them.",
        ),
    ]


def alert_rules(site: Site, opcua: OpcUaCollectorConfig | None = None, spool: SpoolConfig | None = None) -> list[Rule]:
    degrading = degrading_rule(site)
    return [*([degrading] if degrading else []), *silent_rules(site, opcua), *pipeline_rules(site, spool)]


# --- contact points and the policy --------------------------------------------------------------------


def contact_point_name(team: str) -> str:
    return f"flowline-{team}"


def contact_points(emails: Mapping[str, str]) -> list[JSON]:
    """``EmbeddedContactPoint`` per team: e-mail to ``emails[team]`` (comma-separated addresses)."""
    return [
        {
            "uid": contact_point_name(team),
            "name": contact_point_name(team),
            "type": "email",
            "settings": {"addresses": emails[team], "singleEmail": True},
            "disableResolveMessage": False,
        }
        for team in TEAMS
    ]


def flowline_route() -> JSON:
    """The Flowline branch of the policy tree: ``flowline=true``, then one route per team."""
    return {
        "receiver": contact_point_name("operations"),
        "object_matchers": [[FLOWLINE_LABEL[0], "=", FLOWLINE_LABEL[1]]],
        "group_by": ["alertname", "site", "asset"],
        "group_wait": "30s",
        "group_interval": "5m",
        "repeat_interval": "4h",
        "routes": [{"receiver": contact_point_name(team), "object_matchers": [["team", "=", team]]} for team in TEAMS],
    }


def policy_tree(existing: JSON | None = None) -> JSON:
    """The organisation's tree with the Flowline branch first (replacing an older Flowline branch)."""
    tree: JSON = dict(
        existing or {"receiver": contact_point_name("operations"), "group_by": ["grafana_folder", "alertname"]}
    )
    others = [r for r in tree.get("routes") or [] if not _is_flowline_route(r)]
    tree["routes"] = [flowline_route(), *others]
    tree.pop("provenance", None)
    return tree


def _is_flowline_route(route: JSON) -> bool:
    return [FLOWLINE_LABEL[0], "=", FLOWLINE_LABEL[1]] in (route.get("object_matchers") or [])


# --- file provisioning ----------------------------------------------------------------------------------

EMAIL_ENV = {team: f"$FLOWLINE_ALERT_EMAIL_{team.upper()}" for team in TEAMS}


def alerting_file(rules: Sequence[Rule], site: str, emails: Mapping[str, str] | None = None) -> JSON:
    """Grafana's alerting provisioning document (``AlertingFileExport``). Addresses default to
    environment variables, which Grafana expands when it reads the file."""
    addresses = dict(emails or EMAIL_ENV)
    return {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": ORG_ID,
                "name": RULE_GROUP,
                "folder": FOLDER_TITLE,
                "interval": f"{GROUP_INTERVAL_S}s",
                "rules": [r.file_body(site) for r in rules],
            }
        ],
        "contactPoints": [
            {
                "orgId": ORG_ID,
                "name": cp["name"],
                "receivers": [
                    {k: cp[k] for k in ("uid", "type", "settings", "disableResolveMessage")},
                ],
            }
            for cp in contact_points(addresses)
        ],
        "policies": [{"orgId": ORG_ID, **policy_tree()}],
    }


def alerting_yaml(rules: Sequence[Rule], site: str, emails: Mapping[str, str] | None = None) -> str:
    header = (
        "# Grafana alerting for Flowline: rules, contact points, notification policy. Generated by\n"
        "# `flowline dashboards export --alerting-out DIR --site SITE.yaml`; do not edit by hand.\n"
        "# Contact addresses come from FLOWLINE_ALERT_EMAIL_RELIABILITY / _OPERATIONS in Grafana's environment.\n"
        "# The policies entry replaces the organisation's policy tree (`provision --alerts` merges instead).\n"
    )
    return header + yaml.safe_dump(alerting_file(rules, site, emails), sort_keys=False, allow_unicode=True)


# --- API provisioning -----------------------------------------------------------------------------------


class AlertingProvisioner:
    """Creates or updates the rules, contact points and the Flowline policy branch; idempotent."""

    def __init__(self, api: GrafanaApi, folder_uid: str = FOLDER_UID) -> None:
        self.api = api
        self.folder_uid = folder_uid

    def _call(self, what: str, method: str, path: str, body: Any = None) -> Any:
        client = self.api.client
        try:
            if method == "GET":
                return client.GET(path)
            return getattr(client, method)(path, json=body)
        except GrafanaClientError as exc:
            raise ProvisionError(f"Grafana refused to {what}: HTTP {exc.status_code}: {exc.message}") from exc

    def _exists(self, path: str) -> JSON | None:
        try:
            found: JSON = self.api.client.GET(path)
        except GrafanaClientError as exc:
            if int(exc.status_code) == 404:
                return None
            raise ProvisionError(f"Grafana refused to read {path}: HTTP {exc.status_code}: {exc.message}") from exc
        return found

    def run(self, rules: Sequence[Rule], site: str, emails: Mapping[str, str], report: ProvisionReport) -> None:
        existing_points = {
            cp.get("uid"): cp for cp in self._call("list contact points", "GET", "/v1/provisioning/contact-points")
        }
        for cp in contact_points(emails):
            if cp["uid"] in existing_points:
                self._call(
                    f"update contact point {cp['name']}", "PUT", f"/v1/provisioning/contact-points/{cp['uid']}", cp
                )
                report.add("contact", cp["name"], "updated")
            else:
                self._call(f"create contact point {cp['name']}", "POST", "/v1/provisioning/contact-points", cp)
                report.add("contact", cp["name"], "created")
        for rule in rules:
            body = rule.api_body(site, self.folder_uid)
            found = self._exists(f"/v1/provisioning/alert-rules/{rule.uid}")
            if found is None:
                self._call(f"create alert rule {rule.title}", "POST", "/v1/provisioning/alert-rules", body)
                report.add("alert", rule.title, "created")
            elif {k: found.get(k) for k in body} == body:
                report.add("alert", rule.title, "unchanged")
            else:
                self._call(f"update alert rule {rule.title}", "PUT", f"/v1/provisioning/alert-rules/{rule.uid}", body)
                report.add("alert", rule.title, "updated")
        tree = policy_tree(self._call("read the notification policy", "GET", "/v1/provisioning/policies"))
        self._call("update the notification policy", "PUT", "/v1/provisioning/policies", tree)
        report.add("policy", "flowline=true route", "updated")
