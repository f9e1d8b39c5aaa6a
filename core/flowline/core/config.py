"""The deployment config file: one YAML per site install, one section per component.

Each process reads only its own section (``flowline collect opcua --config FILE`` reads
``collectors.opcua`` and the shared keys). Secrets are never inline: every password, token or key is
a `SecretRef` (``{env: NAME}`` or ``{file: PATH}``). Relative paths resolve against the config
file's folder. TLS and authentication are on unless a section explicitly turns them off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flowline.core.errors import ConfigError
from flowline.core.secrets import SecretRef


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsClientConfig(_Section):
    """TLS for an outgoing connection: the CA to trust and, for mutual TLS, our certificate and key."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None


class TlsServerConfig(_Section):
    """TLS for a listening socket; ``client_ca_file`` makes client certificates mandatory (mutual TLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path


class SpoolConfig(_Section):
    max_bytes: int = Field(default=1 << 30, gt=0)
    segment_bytes: int = Field(default=16 << 20, gt=0)
    on_full: Literal["refuse", "drop_oldest"] = "refuse"
    fsync: bool = True


class OpcUaSecurity(_Section):
    """``policy: None`` is only allowed when set explicitly in the config (never the default)."""

    policy: Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"] = (
        "Basic256Sha256"
    )
    mode: Literal["None", "Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    cert_file: Path | None = None
    key_file: Path | None = None
    trusted_server_certs: list[Path] = []
    application_uri: str = "urn:flowline:collector"


class OpcUaEndpoint(_Section):
    url: str
    security: OpcUaSecurity = OpcUaSecurity()
    username: str | None = None
    password: SecretRef | None = None


class OpcUaCollectorConfig(_Section):
    servers: dict[str, OpcUaEndpoint]
    publishing_interval_ms: float = Field(default=1000, gt=0)
    sampling_interval_ms: float = Field(default=1000, ge=0)
    queue_size: int = Field(default=10, ge=1)
    keepalive_timeout_s: float = Field(default=10, gt=0)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30, gt=0)
    timestamp: Literal["source", "server", "collector"] = "source"
    arrays: Literal["flatten", "reject"] = "flatten"
    timestamp_window_s: float = Field(default=7 * 86400, gt=0)
    history_backfill: bool = True
    batch_max_points: int = Field(default=5000, gt=0)
    batch_max_latency_ms: float = Field(default=100, gt=0)


class MqttBrokerConfig(_Section):
    """``tls`` is required: plain MQTT only with ``insecure_plain: true``, said in the config itself."""

    host: str = "127.0.0.1"
    port: int = 8883
    tls: TlsClientConfig | None = None
    insecure_plain: bool = False  # passwords and values in clear text: test brokers only
    username: str | None = None
    password: SecretRef | None = None
    client_id: str = "flowline-collector"
    protocol: Literal["3.1.1", "5"] = "5"
    keepalive_s: int = Field(default=30, gt=0)

    @model_validator(mode="after")
    def _tls_or_explicitly_plain(self) -> MqttBrokerConfig:
        if self.tls is None and not self.insecure_plain:
            raise ValueError(
                "no tls: MQTT without TLS sends passwords and values in clear text; add tls {ca_file: ...}, "
                "or 'insecure_plain: true' for a test broker"
            )
        if self.tls is not None and self.insecure_plain:
            raise ValueError("tls and insecure_plain: true contradict each other; remove insecure_plain")
        return self


class MqttCollectorConfig(_Section):
    broker: MqttBrokerConfig
    qos: Literal[0, 1, 2] = 1
    clean_start: bool = False
    shared_group: str | None = None
    topic_templates: list[str] = []
    sparkplug_groups: list[str] = []
    sparkplug_host_id: str | None = None
    # Sparkplug 3.0: a host that lacks an edge node's BIRTH (it started later) must ask for a rebirth,
    # or it rejects that node's data until the node reconnects (sparkplug.py, RebirthLimiter).
    sparkplug_allow_rebirth: bool = True
    max_payload_bytes: int = Field(default=256 * 1024, gt=0)
    timestamp_window_s: float = Field(default=7 * 86400, gt=0)
    batch_max_points: int = Field(default=5000, gt=0)
    batch_max_latency_ms: float = Field(default=100, gt=0)


class CollectorsConfig(_Section):
    opcua: OpcUaCollectorConfig | None = None
    mqtt: MqttCollectorConfig | None = None


class RelayOtConfig(_Section):
    sender_id: str
    gateway_host: str
    gateway_port: int
    tls: TlsClientConfig
    signing_key: SecretRef
    spools: list[str] = ["opcua", "mqtt"]  # spool folder names under data_dir/spool/
    batch_max_points: int = Field(default=20000, gt=0)
    batch_max_bytes: int = Field(default=4 << 20, gt=0)
    batch_max_latency_ms: float = Field(default=200, gt=0)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30, gt=0)
    ack_timeout_s: float = Field(default=30, gt=0)
    # Diode mode (``flowline relay diode-send``): UDP only, nothing is ever read from the network.
    diode_host: str | None = None
    diode_port: int | None = None
    diode_rate_bytes_s: float = Field(default=20e6, gt=0)  # pacing: stay under the link and receiver
    diode_datagram_bytes: int = Field(default=1200, ge=256, le=65000)
    diode_data_shares: int = Field(default=10, ge=1, le=128)  # k: shares needed to rebuild a block
    diode_total_shares: int = Field(default=16, ge=1, le=256)  # m: shares sent per block (m - k spare)
    diode_heartbeat_s: float = Field(default=1.0, gt=0)


class RelayDmzConfig(_Section):
    listen_host: str = "0.0.0.0"
    listen_port: int = 7443
    tls: TlsServerConfig
    sender_keys: dict[str, SecretRef]  # sender id -> its signing key
    spool: SpoolConfig = SpoolConfig()
    max_frame_bytes: int = Field(default=64 << 20, gt=0)
    max_body_bytes: int = Field(default=256 << 20, gt=0)  # after decompression
    handshake_timeout_s: float = Field(default=10, gt=0)
    idle_timeout_s: float = Field(default=300, gt=0)
    max_connections: int = Field(default=256, gt=0)  # more are closed at once (counted, audited)
    max_handshakes_per_source: int = Field(default=16, gt=0)  # TLS handshakes in progress per peer address
    # Security events: the first per (reason, sender, source) and interval is logged and audited at
    # once, repeats are counted and written as one line with their count when the interval ends.
    security_event_interval_s: float = Field(default=60, gt=0)
    audit_max_bytes: int = Field(default=16 << 20, gt=0)  # audit.jsonl rotates at this size
    audit_keep_files: int = Field(default=5, ge=1)  # rotated files kept: audit.jsonl.1 .. .N
    # Diode mode (``flowline relay diode-receive``)
    diode_listen_host: str = "0.0.0.0"
    diode_listen_port: int = 7444
    diode_gap_timeout_s: float = Field(default=5, gt=0)  # a block still incomplete after this is lost
    diode_max_datagram_bytes: int = Field(default=9000, ge=256, le=65507)  # larger ones are refused
    diode_queue_datagrams: int = Field(default=8192, gt=0)  # between the socket thread and the decoder
    diode_max_pending_bytes: int = Field(default=256 << 20, gt=0)  # shares of batches not yet rebuilt
    diode_sessions_per_sender: int = Field(default=2, ge=1)  # a restarted sender opens a new session
    # Source addresses the diode's datagrams come from (its output side); others are dropped by the
    # socket thread before any parsing. Empty: any source (authentication still applies to all).
    diode_allowed_sources: list[str] = []


class HistorianConfig(_Section):
    url: str = "http://127.0.0.1:8086"
    api: Literal["v1", "v2"] = "v1"
    database: str = "flowline"
    retention_policy: str | None = None
    username: str | None = None
    password: SecretRef | None = None
    token: SecretRef | None = None  # v2 API
    org: str | None = None  # v2 API
    bucket: str | None = None  # v2 API
    batch_max_points: int = Field(default=10000, gt=0)
    batch_max_bytes: int = Field(default=8 << 20, gt=0)
    gzip: bool = True
    timeout_s: float = Field(default=30, gt=0)
    dead_letter_max_bytes: int = Field(default=64 << 20, gt=0)
    dead_letter_file: Path | None = None  # default: chosen by the process (e.g. under data_dir)
    precision: Literal["s", "ms", "ns"] = "ns"  # never "us": InfluxDB 1.6 reads it as ns
    retry_deadline_s: float = Field(default=60, gt=0)  # then the caller keeps the data spooled
    # Retention per tier (InfluxQL durations or "INF"); see flowline/historian/setup.py and rollups.py.
    raw_retention: str = "90d"
    rollup_1m_retention: str = "400d"
    rollup_1h_retention: str = "INF"
    rollup_lag_s: float = Field(default=120, ge=0)  # roll up a window only this long after it ended
    analytics_database: str | None = None  # where analytics writes; None = the same database


class AnalyticsConfig(_Section):
    """``step``: server-side aggregation of the history read; ``rules``: the assessment rules, validated
    by the analytics component (`flowline.analytics.rules.rules_for`; ``horizon_hours`` here
    overrides ``rules.horizon_hours``). The core does not know the rules' keys, so that tuning the
    analytics never changes the config schema every zone shares."""

    step: str = "10m"
    history: str = "14d"
    horizon_hours: float = Field(default=168, gt=0)
    every: str | None = None
    workers: int | None = None
    dask_scheduler: str | None = None
    historian: HistorianConfig | None = None  # read credentials; defaults to the main historian section
    rules: dict[str, Any] = {}


class RollupConfig(_Section):
    """``flowline historian rollup``: it reads telemetry and writes the rollup tiers, which the DMZ
    writer's account (write only) cannot do; give it the ``rollup`` role's account here."""

    historian: HistorianConfig | None = None  # defaults to the main historian section


class FlowlineConfig(_Section):
    site_file: Path
    data_dir: Path = Path("/var/lib/flowline")
    instance: str = "default"
    metrics_interval_s: float = Field(default=5, gt=0)
    spool: SpoolConfig = SpoolConfig()
    collectors: CollectorsConfig = CollectorsConfig()
    relay_ot: RelayOtConfig | None = None
    relay_dmz: RelayDmzConfig | None = None
    historian: HistorianConfig | None = None
    analytics: AnalyticsConfig = AnalyticsConfig()
    rollup: RollupConfig = RollupConfig()

    def spool_dir(self, name: str) -> Path:
        return self.data_dir / "spool" / name


def _resolve_paths(node: Any, base: Path) -> Any:
    """Make every ``*_file``/``*_dir``/``file`` value relative to the config file's folder."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if isinstance(value, str) and (key.endswith(("_file", "_dir")) or key == "file"):
                out[key] = str((base / value).resolve()) if not Path(value).is_absolute() else value
            elif isinstance(value, list) and key.endswith("_certs"):
                out[key] = [str((base / v).resolve()) if isinstance(v, str) else v for v in value]
            else:
                out[key] = _resolve_paths(value, base)
        return out
    if isinstance(node, list):
        return [_resolve_paths(item, base) for item in node]
    return node


def load_config(path: str | Path) -> FlowlineConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return FlowlineConfig.model_validate(_resolve_paths(raw, path.parent.resolve()))
    except ValidationError as exc:
        lines = [f"  {path}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError(f"{path}: invalid config\n" + "\n".join(lines)) from exc
