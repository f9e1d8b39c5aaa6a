"""Where InfluxDB is and how to authenticate: shared by the writer, the readers and the set-up code.

Credentials come from `SecretRef`s in the config (never inline). On the v1 API (InfluxDB 1.x and the
1.x-compatible API of 2.x/3.x) a username/password is sent as HTTP basic auth; a token alone is sent
as ``Authorization: Token …`` (what 2.x and 3.x accept on their v1 endpoints).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import requests

from flowline.core.config import HistorianConfig
from flowline.historian.errors import HistorianAuthError, HistorianNotFoundError

Api = Literal["v1", "v2"]


@dataclass
class Connection:
    """One InfluxDB endpoint plus credentials and a pooled HTTP session (use from one thread)."""

    url: str = "http://127.0.0.1:8086"
    database: str = "flowline"
    retention_policy: str | None = None
    username: str | None = None
    password: str | None = None
    token: str | None = None
    timeout_s: float = 30.0
    session: requests.Session = field(default_factory=requests.Session, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if self.username is not None:
            self.session.auth = (self.username, self.password or "")
        elif self.token is not None:
            self.session.headers["Authorization"] = f"Token {self.token}"

    @classmethod
    def from_config(cls, config: HistorianConfig) -> Connection:
        return cls(
            url=config.url,
            database=config.database,
            retention_policy=config.retention_policy,
            username=config.username,
            password=config.password.read() if config.password is not None else None,
            token=config.token.read() if config.token is not None else None,
            timeout_s=config.timeout_s,
        )

    def who(self) -> str:
        if self.username is not None:
            return f"user {self.username!r}"
        return "the configured token" if self.token is not None else "no credentials"

    def close(self) -> None:
        self.session.close()


def error_message(body: str | bytes | None) -> str:
    """The server's own message from an InfluxDB error body (v1 ``{"error": …}``, v2 ``{"message": …}``)."""
    if body is None:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        parsed = json.loads(text)
    except ValueError:
        return text.strip()[:2000]
    if isinstance(parsed, dict):
        for key in ("error", "message"):
            if isinstance(parsed.get(key), str):
                return str(parsed[key])
    return text.strip()[:2000]


def raise_for_access(conn: Connection, status: int, message: str, action: str) -> None:
    """Turn 401/403 into `HistorianAuthError` and "database not found" into `HistorianNotFoundError`."""
    if status == 401:
        raise HistorianAuthError(
            f"InfluxDB at {conn.url} refused {conn.who()} while trying to {action} (401: {message}); "
            "check the historian username/password or token in the config"
        )
    if status == 403:
        raise HistorianAuthError(
            f"InfluxDB at {conn.url}: {conn.who()} is not allowed to {action} (403: {message}); "
            "grant the privilege or use the right account"
        )
    # 1.6 answers 500 (not 404) for a missing retention policy: retrying would not help either.
    if status == 404 or "database not found" in message or "retention policy not found" in message:
        raise HistorianNotFoundError(
            f"InfluxDB at {conn.url}: cannot {action}: {message or 'not found'} "
            "(create it with 'flowline historian setup')"
        )
