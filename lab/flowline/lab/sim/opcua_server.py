"""The simulator's OPC UA server: the site's OPC UA tags in a browsable address space.

Address space::

    Objects/<site>/<asset>/<tag>        (folder / object / Double variable)

Every variable keeps the node id of the site file (``ns=2;s=P-101.vibration_rms``); a tag configured
only by browse path gets ``s=<asset>.<tag>``. The namespace is registered as
``urn:flowline:sim:<site>`` and is the first one after the server's own, so its index is 2 and the
site file's ``ns=2`` resolves; clients that do not want to rely on the index look the URI up in the
NamespaceArray (``SimOpcUaServer.namespace_uri``). Browse names are ``2:<site>``, ``2:<asset>``,
``2:<tag>``, matching the site file's ``browse_path`` (``0:Objects/2:north-field/2:P-101/2:flow``).

Usage (in an asyncio program)::

    server = SimOpcUaServer(
        site,                                   # flowline.inventory.Site
        port=0,                                 # 0: pick a free port (and retry if it is taken)
        host="127.0.0.1",
        policies=("none", "basic256sha256"),    # also "aes128sha256rsaoaep", "aes256sha256rsapss"
        cert=CertFiles(...),                    # server certificate (flowline.lab.pki), needed unless only "none"
        users={"operator": "secret"},           # optional: username/password only, anonymous refused
        trusted=(ca.files.cert,),               # optional: client certificates must chain to these
        history_days=30.0,                      # how long written values stay readable by HistoryRead
        history_count=7200,                     # and at most this many per variable (2 h at 1 Hz; 0: no cap)
    )
    await server.start()                        # server.url -> "opc.tcp://127.0.0.1:<port>"
    await server.set_value("P-101", "vibration_rms", 2.1, status=0, source_ts=time.time_ns())
    await server.add_variable("TEST", "flag", True, ua.VariantType.Boolean)  # other data types, arrays
    await server.stop(); await server.start()   # restart on the same port; values and history kept
    ...
    async with SimOpcUaServer(site) as server: ...

Pitfalls (DESIGN.md): the server certificate's SAN URI must equal ``application_uri``
(``urn:flowline:sim:<site>:server``, see ``server_certificate``); asyncua accepts any client
certificate unless a trust list is given (``trusted``).
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import errno
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
from asyncua import ua
from asyncua.common.node import Node
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.uacrypto import load_certificate
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.history import HistoryDict
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509

from flowline.core.errors import FlowlineError
from flowline.inventory import Site
from flowline.lab.pki import CertFiles, CertificateAuthority
from flowline.lab.services import free_port

POLICIES: dict[str, tuple[ua.SecurityPolicyType, ...]] = {
    "none": (ua.SecurityPolicyType.NoSecurity,),
    "basic256sha256": (
        ua.SecurityPolicyType.Basic256Sha256_Sign,
        ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ),
    "aes128sha256rsaoaep": (
        ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
        ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
    ),
    "aes256sha256rsapss": (
        ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
        ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
    ),
}
_BIND_ATTEMPTS = 5
NAMESPACE_INDEX = 2  # the first namespace after the server's own; the site file's "ns=2"


class OpcUaServerError(FlowlineError):
    """The simulator's OPC UA server cannot be configured or started."""


def namespace_uri(site: str) -> str:
    return f"urn:flowline:sim:{site}"


def application_uri(site: str) -> str:
    return f"urn:flowline:sim:{site}:server"


def server_certificate(ca: CertificateAuthority, site: str, stem: str = "opcua-server") -> CertFiles:
    """Issue the server certificate with the SAN URI asyncua checks against ``application_uri``."""
    dns = ("localhost", socket.gethostname())
    return ca.issue(f"flowline-sim-{site}", stem=stem, dns=dns, uri=application_uri(site), server=True, client=False)


def _timestamp(value: int | dt.datetime | None) -> ua.DateTime:
    if value is None:
        value = dt.datetime.now(dt.UTC)
    elif isinstance(value, int):
        value = dt.datetime.fromtimestamp(value / 1e9, dt.UTC)
    elif value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return ua.DateTime.fromtimestamp(value.timestamp(), dt.UTC)


def _node_id(identifier: str) -> ua.NodeId:
    return ua.NodeId(ua.String(identifier), ua.Int16(NAMESPACE_INDEX))


def _source_time(value: ua.DataValue) -> dt.datetime:
    return value.SourceTimestamp or dt.datetime.min.replace(tzinfo=dt.UTC)


class _OrderedHistory(HistoryDict):
    """In-memory history kept in source-time order, so seeded past values may follow live ones.

    It outlives each asyncua ``Server`` instance: a restart keeps the history, like a real server's.
    Nodes are registered on their first value, so history can be seeded before the server starts.
    """

    def __init__(self, period: dt.timedelta, count: int) -> None:
        super().__init__(max_history_data_response_size=100_000)
        self.period = period
        self.count = count

    async def save_node_value(self, node_id: ua.NodeId, datavalue: ua.DataValue) -> None:
        if node_id not in self._datachanges:
            await self.new_historized_node(node_id, self.period, self.count)
        data = self._datachanges[node_id]
        period, count = self._datachanges_period[node_id]
        bisect.insort(data, datavalue, key=_source_time)
        if period:
            oldest = dt.datetime.now(dt.UTC) - period
            del data[: bisect.bisect_left(data, oldest, key=_source_time)]
        if count and len(data) > count:
            del data[: len(data) - count]


class _FileTrustStore(TrustStore):
    """asyncua's trust store reads folders only; also accept certificate files (a CA's ca.pem)."""

    async def _load_trust_location(self, location: Path) -> list[x509.Certificate]:
        if await anyio.Path(location).is_file():
            return [await load_certificate(location)]
        return await super()._load_trust_location(location)


class _PasswordUsers:
    """asyncua user manager: known username/password pairs only (no anonymous, no admin)."""

    def __init__(self, users: dict[str, str]) -> None:
        self._users = dict(users)

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        if username is not None and self._users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


@dataclass
class _Var:
    node_id: ua.NodeId
    variant_type: ua.VariantType
    value: ua.DataValue
    historize: bool


class SimOpcUaServer:
    """An asyncua server holding the site's OPC UA tags (see the module docstring)."""

    def __init__(
        self,
        site: Site,
        port: int = 0,
        host: str = "127.0.0.1",
        policies: Sequence[str] = ("none",),
        cert: CertFiles | None = None,
        users: dict[str, str] | None = None,
        trusted: Sequence[Path] = (),
        history_days: float = 30.0,
        history_count: int = 7200,
    ) -> None:
        unknown = [p for p in policies if p not in POLICIES]
        if unknown or not policies:
            raise OpcUaServerError(f"unknown security policies {unknown or '(none)'}, expected {sorted(POLICIES)}")
        if any(p != "none" for p in policies) and cert is None:
            raise OpcUaServerError("secure endpoints need a server certificate (cert=CertFiles)")
        self.site = site
        self.host = host
        self.port = port
        self.policies = tuple(policies)
        self.cert = cert
        self.users = users
        self.trusted = tuple(trusted)
        self.namespace_uri = namespace_uri(site.site)
        self.application_uri = application_uri(site.site)
        self._history = _OrderedHistory(dt.timedelta(days=history_days), history_count)
        self._vars: dict[tuple[str, str], _Var] = {}
        self._server: Server | None = None
        for asset, tag in site.iter_tags("opcua"):
            assert tag.source.opcua is not None  # iter_tags("opcua") guarantees it
            node = tag.source.opcua.node
            try:
                node_id = ua.NodeId.from_string(node) if node else _node_id(f"{asset.id}.{tag.name}")
            except UaError as exc:
                raise OpcUaServerError(f"{asset.id}/{tag.name}: bad node id {node!r}: {exc}") from exc
            if node_id.NamespaceIndex != NAMESPACE_INDEX:
                raise OpcUaServerError(
                    f"{asset.id}/{tag.name}: node {node!r} is outside namespace {NAMESPACE_INDEX}, "
                    f"the only one the simulator serves"
                )
            self._vars[(asset.id, tag.name)] = _Var(
                node_id,
                ua.VariantType.Double,
                ua.DataValue(ua.Variant(0.0, ua.VariantType.Double)),
                True,
            )

    @property
    def url(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def node_id(self, asset: str, tag: str) -> ua.NodeId:
        return self._variable(asset, tag).node_id

    def tags(self) -> list[tuple[str, str]]:
        return list(self._vars)

    async def __aenter__(self) -> SimOpcUaServer:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen on ``port`` (0: a free one, retried if another process takes it first)."""
        if self._server is not None:
            return
        for attempt in range(_BIND_ATTEMPTS):
            port = self.port or free_port()
            server = await self._build(port)
            try:
                await server.start()
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or self.port or attempt == _BIND_ATTEMPTS - 1:
                    raise OpcUaServerError(f"cannot listen on {self.host}:{port}: {exc.strerror}") from exc
                continue
            self.port, self._server = port, server
            return

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop()

    async def set_value(
        self,
        asset: str,
        tag: str,
        value: Any,
        status: int = 0,
        source_ts: int | dt.datetime | None = None,
    ) -> None:
        """Write a value (status: an OPC UA StatusCode, e.g. 0x80000000 bad); historised if the tag is."""
        var = self._variable(asset, tag)
        dv = ua.DataValue(
            ua.Variant(value, var.variant_type),
            ua.StatusCode(ua.UInt32(status)),
            SourceTimestamp=_timestamp(source_ts),
            ServerTimestamp=_timestamp(None),
        )
        var.value = dv
        if self._server is not None:
            await self._server.write_attribute_value(var.node_id, dv)
        if var.historize:
            await self._history.save_node_value(var.node_id, dv)

    async def seed_history(self, asset: str, tag: str, values: Sequence[tuple[int, float]]) -> None:
        """Put past (timestamp_ns, value) samples into the history without changing the live value."""
        var = self._variable(asset, tag)
        for ts_ns, value in values:
            dv = ua.DataValue(ua.Variant(value, var.variant_type), SourceTimestamp=_timestamp(ts_ns))
            dv.ServerTimestamp = dv.SourceTimestamp
            await self._history.save_node_value(var.node_id, dv)

    async def add_variable(
        self,
        asset: str,
        tag: str,
        value: Any,
        variant_type: ua.VariantType = ua.VariantType.Double,
        historize: bool = False,
    ) -> ua.NodeId:
        """Add a variable of any data type (lists make arrays) under Objects/<site>/<asset>/<tag>."""
        if (asset, tag) in self._vars:
            raise OpcUaServerError(f"{asset}/{tag} exists already")
        var = _Var(_node_id(f"{asset}.{tag}"), variant_type, ua.DataValue(ua.Variant(value, variant_type)), historize)
        self._vars[(asset, tag)] = var
        if self._server is not None:
            await self._add_node(self._server, asset, tag, var)
        return var.node_id

    def _variable(self, asset: str, tag: str) -> _Var:
        try:
            return self._vars[(asset, tag)]
        except KeyError:
            raise OpcUaServerError(f"no OPC UA variable {asset}/{tag} on this server") from None

    async def _build(self, port: int) -> Server:
        server = Server(user_manager=_PasswordUsers(self.users) if self.users else None)  # type: ignore[arg-type]
        server.iserver.history_manager.set_storage(self._history)
        await server.init()
        server.set_endpoint(f"opc.tcp://{self.host}:{port}")
        server.set_server_name(f"Flowline plant simulator ({self.site.site})")
        await server.set_application_uri(self.application_uri)
        server.set_security_policy([t for p in self.policies for t in POLICIES[p]])
        if self.users:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        if self.cert is not None:
            await server.load_certificate(str(self.cert.der))
            await server.load_private_key(self.cert.key, format="pem")
        if self.trusted:
            store = _FileTrustStore(list(self.trusted), [])
            await store.load()
            validator = CertificateValidator(
                CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT, store
            )
            server.set_certificate_validator(validator)
        index = await server.register_namespace(self.namespace_uri)
        if index != NAMESPACE_INDEX:
            raise OpcUaServerError(f"namespace {self.namespace_uri} got index {index}, the site file assumes 2")
        for (asset, tag), var in self._vars.items():
            await self._add_node(server, asset, tag, var)
        return server

    async def _folder(self, server: Server, asset: str) -> Node:
        site_id = _node_id(self.site.site)
        site_node = server.get_node(site_id)
        if not await _exists(site_node):
            site_node = await server.nodes.objects.add_folder(
                site_id, ua.QualifiedName(self.site.site, NAMESPACE_INDEX)
            )
        asset_id = _node_id(f"{self.site.site}/{asset}")
        asset_node = server.get_node(asset_id)
        if not await _exists(asset_node):
            asset_node = await site_node.add_object(asset_id, ua.QualifiedName(asset, NAMESPACE_INDEX))
        return asset_node

    async def _add_node(self, server: Server, asset: str, tag: str, var: _Var) -> None:
        parent = await self._folder(server, asset)
        node = await parent.add_variable(
            var.node_id, ua.QualifiedName(tag, NAMESPACE_INDEX), var.value.Value, var.variant_type
        )
        # A restart keeps each value with its own status and source time, as a real server does: a
        # client that reconnects must see the sample it missed, not the same value re-stamped now.
        if var.value.SourceTimestamp is not None:
            await server.write_attribute_value(var.node_id, var.value)
        if var.historize:
            await node.write_attribute(AttributeIds.Historizing, ua.DataValue(ua.Variant(True)))
            access = ua.AccessLevel.CurrentRead.mask | ua.AccessLevel.HistoryRead.mask
            await node.write_attribute(AttributeIds.AccessLevel, ua.DataValue(ua.Variant(access, ua.VariantType.Byte)))
            await node.write_attribute(
                AttributeIds.UserAccessLevel, ua.DataValue(ua.Variant(access, ua.VariantType.Byte))
            )
        if var.value.SourceTimestamp is not None:
            await server.write_attribute_value(var.node_id, var.value)


async def _exists(node: Node) -> bool:
    try:
        await node.read_browse_name()
    except UaStatusCodeError:
        return False
    return True


async def serve_forever(server: SimOpcUaServer, stop: asyncio.Event) -> None:
    """Run ``server`` until ``stop`` is set (used by the CLI and by tests running it in a thread)."""
    async with server:
        await stop.wait()
