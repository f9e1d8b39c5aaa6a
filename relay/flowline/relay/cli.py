"""``flowline relay``: OT sender, DMZ gateway, DMZ -> historian writer, and the diode pair."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import click

from flowline.core.cli import service_logging
from flowline.core.config import FlowlineConfig, load_config
from flowline.core.errors import ConfigError, FlowlineError, NeedsOperatorError

CONFIG = click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Flowline YAML config file.",
)


def _load(path: Path, section: str) -> FlowlineConfig:
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if getattr(config, section) is None:
        raise click.ClickException(f"{path}: this command needs a '{section}' section")
    service_logging()  # services log their connections by default
    return config


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


class NeedsAPerson(click.ClickException):
    """A deployment error retrying cannot fix (credential, missing database): exit status 2, which
    the systemd units list in RestartPreventExitStatus so they do not restart in a loop."""

    exit_code = 2


def _run(what: str, body: Callable[[], None]) -> None:
    try:
        body()
    except NeedsOperatorError as exc:
        raise NeedsAPerson(f"{what}: {exc}") from exc
    except (FlowlineError, OSError, ValueError) as exc:
        raise click.ClickException(f"{what}: {exc}") from exc


@click.group()
def relay() -> None:
    """OT sender and DMZ gateway (mutual TLS, signed batches), writer, and strict diode mode.

    \b
    Examples:
      flowline relay ot --config ot.yaml          # OT: spools -> DMZ gateway (never listens)
      flowline relay dmz --config dmz.yaml        # DMZ: verify, enforce flows, spool, ack
      flowline relay writer --config dmz.yaml     # DMZ: spool -> InfluxDB
      flowline relay diode-send --config ot.yaml  # OT: spools -> UDP, no return path
      flowline relay diode-receive --config dmz.yaml
    """


@relay.command("ot")
@CONFIG
def ot_command(config_path: Path) -> None:
    """Send the OT spools (relay_ot.spools) to the DMZ gateway; ack them only once it acked.

    \b
    Example:
      flowline relay ot --config /etc/flowline/ot.yaml
    """
    config = _load(config_path, "relay_ot")
    from flowline.relay.ot.sender import OtSender

    _run("OT sender", lambda: OtSender(config, _stop_on_signals()).run())


@relay.command("dmz")
@CONFIG
def dmz_command(config_path: Path) -> None:
    """Run the DMZ gateway: TLS 1.3 with client certificates, signature, sequence and flow checks.

    \b
    Example:
      flowline relay dmz --config /etc/flowline/dmz.yaml
    """
    config = _load(config_path, "relay_dmz")
    from flowline.relay.dmz.gateway import run_gateway

    _run("DMZ gateway", lambda: run_gateway(config))


@relay.command("writer")
@CONFIG
def writer_command(config_path: Path) -> None:
    """Forward the DMZ spool to InfluxDB (historian section), acking only what InfluxDB took.

    \b
    Example:
      flowline relay writer --config /etc/flowline/dmz.yaml
    """
    config = _load(config_path, "historian")
    from flowline.relay.dmz.writer import Forwarder

    _run("relay writer", lambda: Forwarder(config, _stop_on_signals()).run())


@relay.command("diode-send")
@CONFIG
def diode_send_command(config_path: Path) -> None:
    """Strict one-way: send the OT spools as FEC-protected UDP datagrams; never reads the network.

    \b
    Example (relay_ot.diode_host/diode_port point at the diode's input):
      flowline relay diode-send --config /etc/flowline/ot.yaml
    """
    config = _load(config_path, "relay_ot")
    from flowline.relay.ot.diode_send import DiodeSender

    _run("diode sender", lambda: DiodeSender(config, _stop_on_signals()).run())


@relay.command("diode-receive")
@CONFIG
def diode_receive_command(config_path: Path) -> None:
    """Receive diode datagrams: rebuild, verify, enforce flows, spool, and account every loss.

    \b
    Example (listens on relay_dmz.diode_listen_host/diode_listen_port):
      flowline relay diode-receive --config /etc/flowline/dmz.yaml
    """
    config = _load(config_path, "relay_dmz")
    from flowline.relay.dmz.diode_receive import DiodeReceiver

    _run("diode receiver", lambda: DiodeReceiver(config, _stop_on_signals()).run())
