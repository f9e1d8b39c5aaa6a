"""The single entry point, ``flowline``. Each component contributes its own command group.

The groups are imported only when they run: their modules pull in asyncua, pandas, statsmodels and
scipy, which would make ``flowline --help`` (and every other command) pay seconds of imports for
code it does not use. `LazyGroup` lists them from `COMMANDS` instead, with their one-line help.

Each zone installs only its components (an OT host has no analytics), so a command whose component
is absent is listed apart and, when called, says which distribution provides it and in which zone,
instead of failing on an import. The core names components by string only: it imports none.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import time
from typing import Any, NamedTuple

import click

from flowline.core import __version__
from flowline.core.errors import FlowlineError, NeedsOperatorError, network_reason

# Every log line starts with its time in UTC (ISO 8601), whatever the host's time zone: logs of the
# OT, DMZ and IT hosts are read side by side.
LOG_FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int) -> None:
    """Log to stderr with UTC timestamps (a no-op when logging is already set up)."""
    formatter = logging.Formatter(LOG_FORMAT, "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])


def service_logging() -> None:
    """Long-running services log their connections and status lines at INFO, also without ``-v``."""
    configure_logging(logging.WARNING)  # when started as ``python -m flowline.relay``, not through `main`
    if logging.getLogger("flowline").getEffectiveLevel() > logging.INFO:
        logging.getLogger("flowline").setLevel(logging.INFO)


class LazyCommand(NamedTuple):
    """Where a command lives ("package.module:attr") and its one-line help for ``flowline --help``.

    ``short_help`` must be the first sentence of the command's docstring (a test checks it).
    """

    target: str
    short_help: str
    component: str  # the distribution that provides it, e.g. "flowline-plant-analytics"
    zone: str  # where it runs: "OT", "DMZ", "IT" or "lab"

    @property
    def package(self) -> str:
        """The component's package (``flowline.analytics``): present exactly when it is installed."""
        return ".".join(self.target.split(":")[0].split(".")[:2])

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


COMMANDS: dict[str, LazyCommand] = {
    "analyze": LazyCommand(
        "flowline.analytics.cli:analyze",
        "Assess every forecast tag: forecasts, time to alarm limit, health flags, written to InfluxDB.",
        "flowline-plant-analytics",
        "IT",
    ),
    "assets": LazyCommand(
        "flowline.inventory.cli:assets",
        "The asset inventory: validate the site file, discover unknown signals.",
        "flowline-plant-inventory",
        "every",
    ),
    "certs": LazyCommand(
        "flowline.lab.certs:certs",
        "Make the relay CA, gateway and sender certificates and the OPC UA client certificate.",
        "flowline-plant-lab",
        "lab",
    ),
    "collect": LazyCommand(
        "flowline.collectors.cli:collect",
        "OT collectors (OPC UA, MQTT): subscribe, map to site tags, append to the OT spool.",
        "flowline-plant-collectors",
        "OT",
    ),
    "dashboards": LazyCommand(
        "flowline.dashboards.cli:dashboards",
        "Grafana dashboards as code: export the JSON, or provision a Grafana through its API.",
        "flowline-plant-dashboards",
        "IT",
    ),
    "demo": LazyCommand(
        "flowline.lab.demo:demo",
        "Run the whole pipeline on this machine and report what landed and which assets are degrading.",
        "flowline-plant-lab",
        "lab (development and demo)",
    ),
    "detect": LazyCommand(
        "flowline.analytics.cli:detect",
        "Score a CSV series row by row, causally: each row's score uses only that row and earlier ones.",
        "flowline-plant-analytics",
        "IT",
    ),
    "export": LazyCommand(
        "flowline.analytics.cli:export",
        "Write tags of one or several assets to Parquet or CSV, streamed in chunks.",
        "flowline-plant-analytics",
        "IT",
    ),
    "historian": LazyCommand(
        "flowline.historian.cli:historian",
        "The InfluxDB historian: set-up, rollups, dead letters.",
        "flowline-plant-historian",
        "IT",
    ),
    "lab": LazyCommand(
        "flowline.lab.labstack:lab",
        "A three-zone network lab (namespaces, nftables) running the demo's site, for reviewers and tests.",
        "flowline-plant-lab",
        "lab (development and demo)",
    ),
    "relay": LazyCommand(
        "flowline.relay.cli:relay",
        "OT sender and DMZ gateway (mutual TLS, signed batches), writer, and strict diode mode.",
        "flowline-plant-relay",
        "OT and DMZ",
    ),
    "stack": LazyCommand(
        "flowline.lab.demo:stack",
        "The demo stack kept running for notebooks and exports: up, status, down.",
        "flowline-plant-lab",
        "lab (development and demo)",
    ),
    "status": LazyCommand(
        "flowline.core.status_cli:status",
        "Show every Flowline process's health from its status file: connections, spool depth, last error.",
        "flowline-plant-core",
        "every",
    ),
    "sim": LazyCommand(
        "flowline.lab.sim.cli:sim",
        "Plant simulator: an OPC UA server and an MQTT publisher with realistic, partly degrading assets.",
        "flowline-plant-lab",
        "lab (development and demo)",
    ),
}


def _failed_command(ctx: click.Context, exc: BaseException) -> str:
    """``dashboards provision``: the deepest command on the way to the exception (click keeps no
    child context on its parent, but every ``invoke`` frame of the traceback holds its own)."""
    path = ctx.command_path
    tb = exc.__traceback__
    while tb is not None:
        frame_ctx = tb.tb_frame.f_locals.get("ctx")
        if isinstance(frame_ctx, click.Context):
            path = frame_ctx.command_path
        tb = tb.tb_next
    return path.partition(" ")[2] or path


def explain(exc: Exception) -> tuple[str, bool]:
    """A one-line message for an exception that reached the entry point, and whether it was foreseen.

    Flowline's own exception classes carry messages written for the person running the command
    (what failed, where, what to check), and so do the operating system's (a file, a port, a
    permission) and the HTTP client's: those are foreseeable conditions and need no traceback.
    Anything else is a bug or a case nobody foresaw: one line, and ``-v`` shows the traceback.
    """
    kind = type(exc)
    if isinstance(exc, FlowlineError) or kind.__module__.split(".")[0] == "flowline":
        return str(exc) or kind.__name__, True
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}", True
    if kind.__module__.split(".")[0] in ("requests", "niquests", "urllib3"):
        return f"network error: {network_reason(exc)}", True
    return f"unexpected error: {kind.__name__}: {exc}", False


class LazyGroup(click.Group):
    """A click group whose subcommands in ``lazy`` are imported on first use.

    It is also the one place where an exception that no command handled ends: as one line on
    stderr and exit status 1 (2 when a person must fix the configuration), never as a traceback
    (unless ``-v`` asks for it).
    """

    def __init__(self, *args: Any, lazy: dict[str, LazyCommand], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *(n for n, c in self.lazy.items() if c.installed())})

    def absent_commands(self) -> list[str]:
        return sorted(n for n, c in self.lazy.items() if n not in self.commands and not c.installed())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            lazy = self.lazy[cmd_name]
            if not lazy.installed():
                return _not_installed(cmd_name, lazy)
            module, _, attr = lazy.target.partition(":")
            command = getattr(importlib.import_module(module), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self.lazy[cmd_name].target} is not a click command")
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click's own: already a clean message and exit status
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except Exception as exc:
            if ctx.params.get("verbose"):
                raise  # -v: the full traceback, for a bug report
            message, foreseen = explain(exc)
            where = _failed_command(ctx, exc)
            hint = "" if foreseen else f" (run 'flowline -v {where} ...' to see the traceback)"
            click.echo(f"Error: flowline {where}: {message}{hint}", err=True)
            ctx.exit(2 if isinstance(exc, NeedsOperatorError) else 1)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``--help`` without importing the commands (same layout as click's)."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            loaded = self.commands.get(name)
            if loaded is None:
                # click's own shortening, applied to the help text kept in the mapping
                text = click.Command(name, help=self.lazy[name].short_help).get_short_help_str(limit)
            elif loaded.hidden:
                continue
            else:
                text = loaded.get_short_help_str(limit)
            rows.append((name, text))
        with formatter.section("Commands"):
            formatter.write_dl(rows)
        absent = self.absent_commands()
        if absent:
            with formatter.section("Not installed on this host (other zones' components)"):
                formatter.write_dl([(n, f"{self.lazy[n].component} ({self.lazy[n].zone})") for n in absent])


def _not_installed(name: str, lazy: LazyCommand) -> click.Command:
    """A stand-in that explains, rather than an import error, why the command is missing here."""

    def refuse() -> None:
        raise click.ClickException(
            f"'{name}' belongs to {lazy.component}, which is not installed in this environment "
            f"(it runs in the {lazy.zone} zone). Install that component on a host of that zone; "
            f"see the README's 'Per-zone installs'."
        )

    # Any arguments are accepted, so that the answer is this message and not a usage error.
    return click.Command(
        name,
        callback=refuse,
        help=lazy.short_help,
        add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(__version__, prog_name="flowline")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Flowline: telemetry from OT collectors through a one-way DMZ relay into InfluxDB,
    with predictive-maintenance analytics and Grafana dashboards.

    \b
    Examples:
      flowline demo --duration 120
      flowline assets check site.yaml
      flowline collect mqtt --config flowline.yaml
    """
    level = logging.WARNING - 10 * verbose
    configure_logging(max(level, logging.DEBUG))
