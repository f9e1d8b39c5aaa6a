"""The demo's site run across the network lab's zones, and ``flowline lab up|down|status``.

Each process runs in the zone it belongs to, with that zone's own config file and data folder:

    ot   Mosquitto (TLS, loopback only), the simulator (OPC UA on loopback, MQTT publisher), both
         collectors, the OT sender (dials the DMZ; listens on nothing)
    dmz  the gateway (or the diode receiver) and the writer: they share the DMZ's disk; the writer
         opens HTTP connections to InfluxDB, the only flow the firewall lets from DMZ to IT
    it   InfluxDB (authentication on)

The lab shares this machine's file system (namespaces isolate networks, not disks); each zone
still reads only its own config and writes only its own data folder, as on separate hosts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import click
import yaml

from flowline.lab.netlab import (
    DIODE_PORT,
    HISTORIAN_PORT,
    RELAY_PORT,
    LabError,
    Mode,
    NetLab,
    address,
    in_netns,
)
from flowline.lab.services import InfluxDServer, ManagedProcess, MosquittoServer, ServiceError
from flowline.lab.stack import LocalStack, StackOptions, StageProcess

# Which zone each stage of the pipeline runs in.
STAGE_ZONES = {
    "relay-dmz": "dmz",
    "diode-receive": "dmz",
    "relay-writer": "dmz",
    "relay-ot": "ot",
    "diode-send": "ot",
    "sim": "ot",
    "collect-opcua": "ot",
    "collect-mqtt": "ot",
}
GATEWAY_NAME = "dmz-gateway"  # the name in the gateway's certificate, checked by the sender (tls.server_name)
PROBE_SPOOL = "probe"  # an extra OT spool the sender drains: tests put counted points in it


class InNetns(ManagedProcess):
    """A managed process started inside a network namespace; its readiness is probed from there too."""

    netns = ""

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().command()]

    def ready(self) -> bool:
        return in_netns(self.netns, super().ready)


class LabInfluxD(InNetns, InfluxDServer):
    def __init__(self, workdir: Path, netns: str, **options: Any) -> None:
        self.netns = netns
        super().__init__(workdir, **options)

    def query(self, q: str, db: str | None = None) -> dict[str, object]:
        return in_netns(self.netns, lambda: InfluxDServer.query(self, q, db))


class LabMosquitto(InNetns, MosquittoServer):
    def __init__(self, workdir: Path, netns: str, **options: Any) -> None:
        self.netns = netns
        super().__init__(workdir, **options)


class LabStage(InNetns, StageProcess):
    def __init__(self, workdir: Path, name: str, args: list[str], ready_marker: str | None, netns: str) -> None:
        self.netns = netns
        super().__init__(workdir, name, args, ready_marker)


class LabStack(LocalStack):
    """`LocalStack` with every process in its zone of ``lab`` and one config file per zone."""

    def __init__(self, workdir: Path, lab: NetLab, options: StackOptions | None = None) -> None:
        super().__init__(workdir, options)
        self.lab = lab
        self.data_dir = self.workdir / "ot-data"  # the OT zone's; the backfill writes its spool here
        self.influx = LabInfluxD(
            self.workdir / "influxdb", lab.namespaces["it"], auth=True, host=address("it"), http_port=HISTORIAN_PORT
        )
        self.configs: dict[str, Path] = {}

    def setup_historian(self) -> list[str]:
        # InfluxDB listens on the IT zone's address only: the set-up (LocalStack's, setup_v1) runs there.
        return in_netns(self.lab.namespaces["it"], super().setup_historian)

    def new_mosquitto(self, workdir: Path, **options: Any) -> MosquittoServer:
        return LabMosquitto(workdir, self.lab.namespaces["ot"], **options)

    def prepare(self) -> None:
        super().prepare()
        # Reached by name, not by loopback address: the sender checks this name (relay_ot.tls.server_name).
        self.gateway_cert = self.ca.issue(GATEWAY_NAME, stem="gateway", dns=(GATEWAY_NAME,), ips=(), client=False)

    def write_config(self) -> Path:
        combined: dict[str, Any] = yaml.safe_load(super().write_config().read_text())
        self.config_path.unlink()  # no zone gets the others' sections
        common = {key: combined[key] for key in ("site_file", "instance", "metrics_interval_s")}
        dmz = address("dmz")
        relay_ot = {
            **combined["relay_ot"],
            "gateway_host": dmz,
            "gateway_port": RELAY_PORT,
            "tls": {**combined["relay_ot"]["tls"], "server_name": GATEWAY_NAME},
            "spools": [*combined["relay_ot"]["spools"], PROBE_SPOOL],
            "diode_host": dmz,
            "diode_port": DIODE_PORT,
            "diode_rate_bytes_s": 5_000_000,
        }
        relay_dmz = {
            **combined["relay_dmz"],
            "listen_host": dmz,
            "listen_port": RELAY_PORT,
            "diode_listen_host": dmz,
            "diode_listen_port": DIODE_PORT,
            "diode_gap_timeout_s": 3,
        }
        docs = {
            "ot": {
                **common,
                "data_dir": str(self.data_dir),
                "collectors": combined["collectors"],
                "relay_ot": relay_ot,
            },
            "dmz": {
                **common,
                "data_dir": str(self.workdir / "dmz-data"),
                "relay_dmz": relay_dmz,
                "historian": combined["historian"],
            },
            "it": {**common, "data_dir": str(self.workdir / "it-data"), "analytics": combined["analytics"]},
        }
        for zone, doc in docs.items():
            path = self.workdir / f"{zone}.yaml"
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            self.configs[zone] = path
        return self.configs["ot"]

    def stage(self, name: str, args: list[str], ready_marker: str | None = None) -> StageProcess:
        process = LabStage(self.logs_dir, name, args, ready_marker, self.lab.namespaces[STAGE_ZONES[name]])
        self.stages[name] = process
        return process

    def start_pipeline(self) -> None:
        ot, dmz = str(self.configs["ot"]), str(self.configs["dmz"])
        if self.lab.mode == "diode":
            self.stage("diode-receive", ["relay", "diode-receive", "--config", dmz], "READY").start()
        else:
            self.stage("relay-dmz", ["relay", "dmz", "--config", dmz], "READY").start()
        self.stage("relay-writer", ["relay", "writer", "--config", dmz], "READY").start()
        if self.lab.mode == "diode":
            self.stage("diode-send", ["relay", "diode-send", "--config", ot], "READY").start()
        else:
            self.stage("relay-ot", ["relay", "ot", "--config", ot], "READY").start()
        if self.options.simulate:
            self.stage("sim", self.sim_args(), "READY").start()
        self.stage("collect-opcua", ["collect", "opcua", "--config", ot], "READY").start()
        self.stage("collect-mqtt", ["collect", "mqtt", "--config", ot], "READY").start()

    def process_ids(self) -> dict[str, int]:
        """Process id of every service and stage that runs (each leads its own process group)."""
        return {name: p.pid for name, p in self.processes() if p.pid is not None and p.running}


# --- CLI -------------------------------------------------------------------------------------------

STATE_FILE = "lab.json"
WORKDIR = click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".flowline-lab"),
    show_default=True,
    help="Folder for the lab's configs, certificates, data and logs.",
)


def _state(workdir: Path) -> dict[str, Any]:
    path = workdir / STATE_FILE
    if not path.exists():
        raise click.ClickException(f"no lab in {workdir} (no {STATE_FILE}): start one with 'flowline lab up'")
    state: dict[str, Any] = json.loads(path.read_text())
    return state


def _netlab(state: dict[str, Any]) -> NetLab:
    return NetLab(state["prefix"], state["mode"], state.get("loss_pct", 0), suffix=state["suffix"])


def _stop_processes(pids: dict[str, int]) -> None:
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)  # only groups this lab started (recorded at `lab up`)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids.values()):
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@click.group()
def lab() -> None:
    """A three-zone network lab (namespaces, nftables) running the demo's site, for reviewers and tests.

    \b
    Examples (as root; needs iproute2 and nftables):
      flowline lab up                      # OT, DMZ, IT and a firewall; the whole pipeline in its zones
      flowline lab up --mode diode --loss 5
      flowline lab status                  # processes, firewall counters, OT listening sockets
      flowline lab down
    """


@lab.command("up")
@WORKDIR
@click.option("--mode", type=click.Choice(["tcp", "diode"]), default="tcp", show_default=True)
@click.option("--loss", type=click.IntRange(0, 100), default=0, show_default=True, help="Diode link loss, percent.")
@click.option("--backfill-days", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
def up_command(workdir: Path, mode: Mode, loss: int, backfill_days: float, seed: int) -> None:
    """Build the zones and the firewall, start every process in its zone, and leave them running.

    \b
    Example:
      flowline lab up && ip netns exec "$(flowline lab status --namespace dmz)" bash
    """
    workdir = workdir.resolve()
    if (workdir / STATE_FILE).exists():
        raise click.ClickException(f"a lab is already up in {workdir}: 'flowline lab down' first")
    net = NetLab("flowline-lab", mode, loss)
    stack = LabStack(workdir, net, StackOptions(seed=seed, backfill_days=backfill_days))
    try:
        net.up()
        stack.start(backfill=backfill_days > 0)
    except (LabError, ServiceError, TimeoutError, OSError) as exc:
        stack.stop()
        net.down()
        raise click.ClickException(f"the lab did not come up: {exc}") from exc
    except BaseException:
        stack.stop()
        net.down()
        raise
    state = {
        "prefix": net.prefix,
        "suffix": net.suffix,
        "mode": mode,
        "loss_pct": loss,
        "namespaces": net.namespaces,
        "pids": stack.process_ids(),
    }
    (workdir / STATE_FILE).write_text(json.dumps(state, indent=2))
    click.echo(f"lab up in {workdir} ({mode}{f', {loss} % loss' if mode == 'diode' else ''})")
    for zone, ns in net.namespaces.items():
        where = address(zone) if zone != "fw" else "10.77.{1,2,3}.1"
        click.echo(f"  {zone:4} {ns:28} {where}")
    click.echo("firewall rules:\n" + net.ruleset())
    click.echo(f"logs in {stack.logs_dir}; a shell in a zone: ip netns exec {net.namespaces['dmz']} bash")


@lab.command("status")
@WORKDIR
@click.option(
    "--namespace", "zone", type=click.Choice(["ot", "dmz", "it", "fw"]), help="Print only that namespace's name."
)
def status_command(workdir: Path, zone: str | None) -> None:
    """Show the lab's namespaces, its processes, the firewall counters and OT's listening sockets.

    \b
    Example:
      flowline lab status
    """
    state = _state(workdir.resolve())
    net = _netlab(state)
    if zone is not None:
        click.echo(net.namespaces[zone])
        return
    present = net.exists()
    for name, ns in net.namespaces.items():
        click.echo(f"namespace {name:4} {ns:28} {'up' if present[name] else 'MISSING'}")
    for name, pid in state["pids"].items():
        click.echo(f"process   {name:14} pid {pid:<8} {'running' if _alive(pid) else 'EXITED'}")
    if not all(present.values()):
        raise click.ClickException("the lab is incomplete: 'flowline lab down' and up again")
    for name, packets in net.counters().items():
        click.echo(f"counter   {name:20} {packets} packets")
    listeners = net.listeners("ot")
    click.echo("OT listening sockets: " + (", ".join(f"{s.proto} {s.local}" for s in listeners) or "none"))


@lab.command("down")
@WORKDIR
def down_command(workdir: Path) -> None:
    """Stop the lab's processes and delete its namespaces, links and rules (logs and data stay).

    \b
    Example:
      flowline lab down
    """
    workdir = workdir.resolve()
    state = _state(workdir)
    _stop_processes({k: int(v) for k, v in state["pids"].items()})
    _netlab(state).down()
    (workdir / STATE_FILE).unlink()
    click.echo(f"lab down; logs and data kept in {workdir}")
