"""``flowline assets discover --opcua URL``: what a server exposes that the site file lacks, and vice versa."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import click
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.ua.uaerrors import UaError
from rich.console import Console
from rich.table import Table

from flowline.collectors.opcua_security import OpcUaSecurityError, apply_security
from flowline.core.config import OpcUaEndpoint, OpcUaSecurity, load_config
from flowline.core.errors import ConfigError
from flowline.inventory import Site, SiteFileError, load_site

MAX_DEPTH = 12  # browse depth guard: address spaces can have reference cycles


@dataclass(frozen=True)
class Variable:
    node: str
    browse_path: str


@dataclass(frozen=True)
class MissingTag:
    asset: str
    tag: str
    node: str | None
    browse_path: str | None


@dataclass
class Discovery:
    url: str
    variables: int
    unknown: list[Variable]
    missing: list[MissingTag]


async def browse_variables(client: Client) -> list[Variable]:
    """Every Variable under Objects outside namespace 0 (the server's own diagnostics)."""
    found: list[Variable] = []
    seen: set[ua.NodeId] = set()
    stack: list[tuple[Node, str, int]] = [(client.nodes.objects, "0:Objects", 0)]
    while stack:
        node, path, depth = stack.pop()
        refs = await node.get_children_descriptions()
        for ref in refs:
            child = ref.NodeId
            if child in seen or child.NamespaceIndex == 0:
                continue
            seen.add(child)
            child_path = f"{path}/{ref.BrowseName.NamespaceIndex}:{ref.BrowseName.Name}"
            if ref.NodeClass == ua.NodeClass.Variable:
                found.append(Variable(child.to_string(), child_path))
            if depth < MAX_DEPTH and ref.NodeClass in (ua.NodeClass.Object, ua.NodeClass.Variable):
                stack.append((client.get_node(child), child_path, depth + 1))
    return sorted(found, key=lambda v: v.browse_path)


def compare(site: Site, server: str, url: str, variables: list[Variable]) -> Discovery:
    nodes = {v.node for v in variables}
    paths = {v.browse_path for v in variables}
    known_nodes: set[str] = set()
    known_paths: set[str] = set()
    missing: list[MissingTag] = []
    for asset, tag in site.iter_tags("opcua"):
        src = tag.source.opcua
        if src is None or src.server != server:
            continue
        node = ua.NodeId.from_string(src.node).to_string() if src.node else None
        known_nodes.add(node or "")
        known_paths.add(src.browse_path or "")
        if not ((node and node in nodes) or (src.browse_path and src.browse_path in paths)):
            missing.append(MissingTag(asset.id, tag.name, src.node, src.browse_path))
    unknown = [v for v in variables if v.node not in known_nodes and v.browse_path not in known_paths]
    return Discovery(url, len(variables), unknown, missing)


async def discover_opcua(site: Site, endpoint: OpcUaEndpoint, server: str, rejected_dir: Path) -> Discovery:
    client = Client(endpoint.url, timeout=10)
    await apply_security(client, endpoint, server, rejected_dir, 10)
    async with client:
        variables = await browse_variables(client)
    return compare(site, server, endpoint.url, variables)


def _print_table(result: Discovery) -> None:
    console = Console()
    console.print(f"[bold]{result.url}[/]: {result.variables} variables, {len(result.unknown)} not in the site file, "
                  f"{len(result.missing)} site tags missing on the server")  # fmt: skip
    if result.unknown:
        table = Table("node id", "browse path", title="Variables the site file does not know")
        for v in result.unknown:
            table.add_row(v.node, v.browse_path)
        console.print(table)
    if result.missing:
        table = Table("asset", "tag", "node id", "browse path", title="Site tags the server lacks")
        for m in result.missing:
            table.add_row(m.asset, m.tag, m.node or "", m.browse_path or "")
        console.print(table)


@click.command()
@click.option("--opcua", "url", required=True, help="OPC UA server URL, e.g. opc.tcp://plc1:4840")
@click.option("--site", "site_file", required=True, type=click.Path(path_type=Path), help="Site file to compare with.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="Take security from this config.")
@click.option("--server", default="default", show_default=True, help="Server name in the site file and config.")
@click.option("--insecure", is_flag=True, help="Connect without security (only when no --config is given).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def discover(url: str, site_file: Path, config_file: Path | None, server: str, insecure: bool, as_json: bool) -> None:
    """Browse an OPC UA server; list variables the site file does not know and site tags the server lacks.

    Exit status 0 when both lists are empty, 3 when there are differences.

    \b
    Examples:
      flowline assets discover --opcua opc.tcp://plc1:4840 --site site.yaml --config ot.yaml
      flowline assets discover --opcua opc.tcp://127.0.0.1:4840 --site site.yaml --insecure --json
    """
    try:
        site = load_site(site_file)
        if config_file is not None:
            config = load_config(config_file)
            servers = config.collectors.opcua.servers if config.collectors.opcua else {}
            if server not in servers:
                raise click.ClickException(f"{config_file}: collectors.opcua.servers has no server {server!r}")
            endpoint = servers[server].model_copy(update={"url": url})
            rejected = config.data_dir / "pki" / "rejected"
        elif insecure:
            endpoint = OpcUaEndpoint(url=url, security=OpcUaSecurity(policy="None", mode="None"))
            rejected = Path.cwd()
        else:
            raise click.ClickException("give --config (security settings and trust list) or --insecure")
        result = asyncio.run(discover_opcua(site, endpoint, server, rejected))
    except (SiteFileError, ConfigError, OpcUaSecurityError) as exc:
        raise click.ClickException(str(exc)) from exc
    except (TimeoutError, OSError, UaError) as exc:
        raise click.ClickException(f"cannot browse {url}: {exc!r}") from exc
    if as_json:
        click.echo(json.dumps(asdict(result), indent=2))
    else:
        _print_table(result)
    sys.exit(3 if result.unknown or result.missing else 0)
