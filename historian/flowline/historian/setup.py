"""Create the historian's storage and least-privilege accounts.

InfluxDB 1.x (tested here against 1.6): one database with three retention policies, one per tier —
``raw`` (the default policy, ``historian.raw_retention``), ``rollup_1m`` and ``rollup_1h`` (see
`flowline.historian.rollups`) — and one account per role:

========== =====================================================================================
role       grants
========== =====================================================================================
writer     WRITE on the database (the DMZ gateway's writer: cannot read anything back)
rollup     ALL on the database (reads ``telemetry``, writes ``telemetry_1m``/``telemetry_1h``)
analytics  READ on the database, and WRITE for its own measurements (see below)
grafana    READ on the database (and on the analytics database when there is one)
========== =====================================================================================

InfluxDB 1.x grants privileges per database, not per measurement. Analytics must read telemetry and
write ``asset_health``/``forecast``/``events``/``inventory``, so there are two choices:

- default (``historian.analytics_database`` unset): analytics gets ALL on the one database. Simple
  for dashboards (one datasource), but analytics could also write telemetry;
- ``historian.analytics_database: flowline_analytics``: analytics gets READ on the telemetry database
  and ALL on its own database, so it cannot touch telemetry at all; Grafana reads both.

Sites that want the strict separation set ``analytics_database``; the analytics engineer's writer must
then target it. (With 2.x/3.x tokens the same split is per bucket.)

InfluxDB 2.x (`flowline.historian.setup_v2.setup_v2`): a bucket per tier with its retention rule,
the DBRP mappings that let InfluxQL and the v1 write API address them as ``db.raw``,
``db.rollup_1m`` and ``db.rollup_1h``, and an API token per role scoped to those buckets (the same
grants, per bucket). Tested against a strict stand-in built from InfluxData's OpenAPI descriptions
(tests/test_influx_v2.py), not against a real 2.x server, which does not install here. InfluxDB 3
has no retention policies: create one database per tier (or one database with a retention period)
with its own tooling and point ``historian.database``/``retention_policy`` at it.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowline.core.config import HistorianConfig
from flowline.historian.connection import Connection
from flowline.historian.errors import HistorianError
from flowline.historian.query import HistorianReader, Series, quote_ident, quote_literal
from flowline.historian.tiers import tiers

ROLES = ("writer", "rollup", "analytics", "grafana")


@dataclass(frozen=True)
class Account:
    name: str
    password: str


def grants_for(role: str, config: HistorianConfig) -> list[tuple[str, str]]:
    """(database, privilege) pairs for a role; see the module docstring for why."""
    db, extra = config.database, config.analytics_database
    if role == "writer":
        return [(db, "WRITE")]
    if role == "rollup":
        return [(db, "ALL")]
    if role == "analytics":
        return [(db, "READ"), (extra, "ALL")] if extra else [(db, "ALL")]
    if role == "grafana":
        return [(db, "READ")] + ([(extra, "READ")] if extra else [])
    raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")


def redact(text: str, secret: str | None) -> str:
    """``text`` with every form of ``secret`` it may carry (as is, as an InfluxQL literal, as a repr) masked."""
    if not secret:
        return text
    for form in sorted(
        {quote_literal(secret), repr(quote_literal(secret))[1:-1], repr(secret)[1:-1], secret}, key=len, reverse=True
    ):
        text = text.replace(form, "***")
    return text


def setup_v1(admin: Connection, config: HistorianConfig, accounts: dict[str, Account]) -> list[str]:
    """Create/align databases, retention policies and role accounts; return the statements run.

    Idempotent: existing policies are altered to the configured durations, existing users get the
    configured password and grants (so re-running after a config change converges).
    """
    runner = HistorianReader(admin)
    done: list[str] = []

    def run(statement: str, database: str | None = None, secret: str | None = None) -> list[Series]:
        done.append(redact(statement, secret))
        try:
            return runner.query(statement, database=database)
        except HistorianError as exc:
            if secret is None:
                raise
            # Errors quote the statement (escaped in ways no replace can follow): name the statement
            # redacted, keep InfluxDB's own message only if it carries no piece of the password.
            reason = str(exc).rsplit(": ", 1)[-1]
            if any(secret[i : i + 6] in reason for i in range(max(1, len(secret) - 5))):
                reason = "(InfluxDB's message withheld: it quotes the password)"
            raise type(exc)(f"InfluxDB refused {redact(statement, secret)}: {reason}") from None

    databases = [config.database] + ([config.analytics_database] if config.analytics_database else [])
    for database in databases:
        run(f"CREATE DATABASE {quote_ident(database)}")
    existing = {row[0] for s in run(f"SHOW RETENTION POLICIES ON {quote_ident(config.database)}") for row in s.values}
    for tier in tiers(config):
        verb = "ALTER" if tier.policy in existing else "CREATE"
        keyword = "" if verb == "ALTER" else " REPLICATION 1"
        run(
            f"{verb} RETENTION POLICY {quote_ident(tier.policy)} ON {quote_ident(config.database)} "
            f"DURATION {tier.duration}{keyword}{' DEFAULT' if tier.default else ''}"
        )
    users = {row[0] for s in run("SHOW USERS") for row in s.values}
    for role, account in accounts.items():
        grants = grants_for(role, config)
        if account.name in users:
            run(
                f"SET PASSWORD FOR {quote_ident(account.name)} = {quote_literal(account.password)}",
                secret=account.password,
            )
        else:
            run(
                f"CREATE USER {quote_ident(account.name)} WITH PASSWORD {quote_literal(account.password)}",
                secret=account.password,
            )
        for database in databases:
            run(f"REVOKE ALL ON {quote_ident(database)} FROM {quote_ident(account.name)}")
        for database, privilege in grants:
            run(f"GRANT {privilege} ON {quote_ident(database)} TO {quote_ident(account.name)}")
    return done
