"""InfluxDB 2.x set-up through influxdb-client (see `flowline.historian.setup` for the design).

NOT TESTED here: only InfluxDB 1.6 (no v2 API) is installable on the build machines; the code
follows influxdb-client 1.50's API.
"""
# influxdb-client's generated API classes carry no type annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from flowline.core.config import HistorianConfig
from flowline.historian.setup import Account, grants_for
from flowline.historian.tiers import RAW_POLICY, Tier, duration_seconds, tiers


def setup_v2(
    url: str, admin_token: str, org: str, config: HistorianConfig, accounts: dict[str, Account]
) -> list[str]:
    """InfluxDB 2.x: buckets per tier, DBRP mappings for InfluxQL/v1 writes, v1 credentials per role.

    Buckets are named ``<database>/<policy>`` (the 2.x convention for DBRP-mapped buckets).
    """
    from influxdb_client.client.influxdb_client import InfluxDBClient
    from influxdb_client.domain.bucket_retention_rules import BucketRetentionRules
    from influxdb_client.domain.dbrp_create import DBRPCreate
    from influxdb_client.domain.legacy_authorization_post_request import LegacyAuthorizationPostRequest
    from influxdb_client.domain.password_reset_body import PasswordResetBody
    from influxdb_client.domain.permission import Permission
    from influxdb_client.domain.permission_resource import PermissionResource
    from influxdb_client.service.dbr_ps_service import DBRPsService
    from influxdb_client.service.legacy_authorizations_service import LegacyAuthorizationsService

    done: list[str] = []
    with InfluxDBClient(url=url, token=admin_token, org=org) as client:
        org_id = client.organizations_api().find_organizations(org=org)[0].id
        buckets_api = client.buckets_api()
        bucket_ids: dict[str, str] = {}
        databases = [config.database] + ([config.analytics_database] if config.analytics_database else [])
        for database in databases:
            for tier in tiers(config) if database == config.database else [Tier(RAW_POLICY, "INF", True)]:
                name = f"{database}/{tier.policy}"
                seconds = duration_seconds(tier.duration) or 0  # 0 = keep forever
                bucket = buckets_api.find_bucket_by_name(name) or buckets_api.create_bucket(
                    bucket_name=name,
                    retention_rules=BucketRetentionRules(type="expire", every_seconds=seconds),
                    org_id=org_id,
                )
                bucket_ids[name] = bucket.id
                DBRPsService(client.api_client).post_dbrp(
                    DBRPCreate(
                        org_id=org_id, bucket_id=bucket.id, database=database,
                        retention_policy=tier.policy, default=tier.default,
                    )
                )
                done.append(f"bucket {name} ({tier.duration}) mapped to {database}.{tier.policy}")
        legacy = LegacyAuthorizationsService(client.api_client)
        for role, account in accounts.items():
            permissions = []
            for database, privilege in grants_for(role, config):
                actions = {"READ": ["read"], "WRITE": ["write"], "ALL": ["read", "write"]}[privilege]
                for name, bucket_id in bucket_ids.items():
                    if name.startswith(database + "/"):
                        resource = PermissionResource(type="buckets", id=bucket_id, org_id=org_id)
                        permissions += [Permission(action=a, resource=resource) for a in actions]
            auth = legacy.post_legacy_authorizations(
                LegacyAuthorizationPostRequest(org_id=org_id, token=account.name, permissions=permissions)
            )
            legacy.post_legacy_authorizations_id_password(auth.id, PasswordResetBody(password=account.password))
            done.append(f"v1 authorization {account.name} for role {role}")
    return done

