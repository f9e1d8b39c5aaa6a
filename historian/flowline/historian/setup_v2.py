"""InfluxDB 2.x set-up through influxdb-client (see `flowline.historian.setup` for the design).

Only requests of InfluxData's published 2.x API description are used (``/api/v2/orgs``,
``/buckets``, ``/dbrps``, ``/authorizations``): `tests/test_influx_v2.py` runs this module against
a strict stand-in server that refuses anything else. Role credentials are API tokens created with
``POST /api/v2/authorizations``, scoped to the role's buckets; the services send them as
``Authorization: Token …`` on the 1.x-compatible ``/write`` and ``/query``. (The v1 username/password
"legacy authorizations" live under ``/private/legacy/authorizations``, which the published
description does not define, so they are not used.) InfluxDB generates token values: they are
returned once, for the operator to store as the roles' secrets.
"""
# influxdb-client's generated API classes carry no type annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from flowline.core.config import HistorianConfig
from flowline.historian.setup import grants_for
from flowline.historian.tiers import RAW_POLICY, Tier, duration_seconds, tiers

_ACTIONS = {"READ": ["read"], "WRITE": ["write"], "ALL": ["read", "write"]}


@dataclass
class V2Setup:
    done: list[str] = field(default_factory=list)  # what was created or found, one line each
    tokens: dict[str, str] = field(default_factory=dict)  # role -> its new API token


def setup_v2(url: str, admin_token: str, org: str, config: HistorianConfig, roles: Sequence[str]) -> V2Setup:
    """InfluxDB 2.x: a bucket per tier, the DBRP mappings that let InfluxQL and the 1.x-compatible
    write address them as ``db.raw`` etc., and one API token per role scoped to those buckets.

    Buckets are named ``<database>/<policy>`` (the 2.x convention for DBRP-mapped buckets). Buckets
    and mappings that exist are kept (safe to re-run); every run creates new tokens for ``roles``.
    """
    from influxdb_client.client.influxdb_client import InfluxDBClient
    from influxdb_client.domain.bucket_retention_rules import BucketRetentionRules
    from influxdb_client.domain.dbrp_create import DBRPCreate
    from influxdb_client.domain.permission import Permission
    from influxdb_client.domain.permission_resource import PermissionResource
    from influxdb_client.service.dbr_ps_service import DBRPsService

    result = V2Setup()
    with InfluxDBClient(url=url, token=admin_token, org=org) as client:
        org_id = client.organizations_api().find_organizations(org=org)[0].id
        buckets_api = client.buckets_api()
        dbrps = DBRPsService(client.api_client)
        bucket_ids: dict[str, str] = {}
        databases = [config.database] + ([config.analytics_database] if config.analytics_database else [])
        for database in databases:
            for tier in tiers(config) if database == config.database else [Tier(RAW_POLICY, "INF", True)]:
                name = f"{database}/{tier.policy}"
                seconds = duration_seconds(tier.duration) or 0  # 0 = keep forever
                bucket = buckets_api.find_bucket_by_name(name) or buckets_api.create_bucket(
                    bucket_name=name,
                    retention_rules=BucketRetentionRules(type="expire", every_seconds=seconds),
                    org=org_id,
                )
                bucket_ids[name] = bucket.id
                if not dbrps.get_dbr_ps(org_id=org_id, db=database, rp=tier.policy).content:
                    dbrps.post_dbrp(
                        DBRPCreate(
                            org_id=org_id, bucket_id=bucket.id, database=database,
                            retention_policy=tier.policy, default=tier.default,
                        )
                    )  # fmt: skip
                result.done.append(f"bucket {name} ({tier.duration}) mapped to {database}.{tier.policy}")
        for role in roles:
            permissions = []
            for database, privilege in grants_for(role, config):
                for name, bucket_id in bucket_ids.items():
                    if name.startswith(database + "/"):
                        resource = PermissionResource(type="buckets", id=bucket_id, org_id=org_id)
                        permissions += [Permission(action=a, resource=resource) for a in _ACTIONS[privilege]]
            auth = client.authorizations_api().create_authorization(org_id=org_id, permissions=permissions)
            result.tokens[role] = auth.token
            result.done.append(f"API token for role {role} ({len(permissions)} bucket permissions)")
    return result
