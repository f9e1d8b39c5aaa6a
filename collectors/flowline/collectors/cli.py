"""``flowline collect opcua|mqtt --config FILE``: the OT collectors as long-running processes."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import click

from flowline.core.cli import service_logging
from flowline.core.config import FlowlineConfig, load_config
from flowline.core.errors import ConfigError, DependencyError, FlowlineError
from flowline.core.metrics import Metrics
from flowline.core.status import ProcessStatus, link_summary

log = logging.getLogger("flowline.collectors")

STATUS_EVERY_S = 10.0


class _Collector(Protocol):
    metrics: Metrics
    status: ProcessStatus

    def start(self) -> None: ...

    def stop(self) -> None: ...


def _load(config_file: Path) -> FlowlineConfig:
    try:
        return load_config(config_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def status_line(name: str, metrics: Metrics, status: ProcessStatus) -> str:
    """The periodic line: each source's connection state (and why it is down), then the counters."""
    doc = status.document()
    now = time.time()
    links = "; ".join(link_summary(target, link, now) for target, link in doc["links"].items())
    return (
        f"{name}: {links or 'no source configured'}; in {metrics.total('points_in_total'):.0f} "
        f"spooled {metrics.total('points_out_total'):.0f} rejected {metrics.total('rejected_total'):.0f} "
        f"reconnects {metrics.total('reconnects_total'):.0f} "
        f"connect attempts {metrics.total('connect_attempts_total'):.0f}"
    )


def _run(make: type[_Collector], config: FlowlineConfig, name: str) -> None:
    service_logging()
    try:
        collector = make(config)  # type: ignore[call-arg]
    except (FlowlineError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    collector.start()
    collector.status.start()
    log.info("%s collector running; spool %s (Ctrl-C to stop)", name, config.spool_dir(name))
    print(f"READY collector-{name} spool {config.spool_dir(name)}", flush=True)  # for supervisors, like every stage
    try:
        while not stop.wait(STATUS_EVERY_S):
            log.info("%s", status_line(name, collector.metrics, collector.status))
    finally:
        collector.stop()
        collector.status.stop()
    sys.exit(0)


def _checked(check: Callable[[], None]) -> None:
    try:
        check()
    except DependencyError as exc:
        raise click.ClickException(str(exc)) from exc


CONFIG = click.option(
    "--config", "config_file", required=True, type=click.Path(path_type=Path), help="Flowline config YAML."
)


@click.group()
def collect() -> None:
    """OT collectors (OPC UA, MQTT): subscribe, map to site tags, append to the OT spool."""


@collect.command()
@CONFIG
def mqtt(config_file: Path) -> None:
    """Subscribe to the broker in collectors.mqtt (JSON topics and Sparkplug B) until stopped.

    \b
    Example:
      flowline collect mqtt --config /etc/flowline/ot.yaml
    """
    from flowline.collectors.compat import check_paho
    from flowline.collectors.mqtt import MqttCollector

    _checked(check_paho)
    _run(MqttCollector, _load(config_file), "mqtt")


@collect.command()
@CONFIG
def opcua(config_file: Path) -> None:
    """Subscribe to the OPC UA servers in collectors.opcua until stopped (reconnects by itself).

    \b
    Example:
      flowline collect opcua --config /etc/flowline/ot.yaml
    """
    from flowline.collectors.compat import check_asyncua
    from flowline.collectors.opcua import OpcUaCollectorProcess

    _checked(check_asyncua)
    _run(OpcUaCollectorProcess, _load(config_file), "opcua")
