"""``flowline demo``: the whole pipeline on one machine, end to end, with a report at the end.

simulated plant -> collectors -> OT spools -> relay (OT sender, DMZ gateway, writer) -> InfluxDB
-> analytics -> dashboards. Every stage is a real process talking to real servers; see `stack.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from flowline.lab.services import ServiceError
from flowline.lab.stack import DATABASE, EXAMPLE_SITE, LocalStack, StackOptions

MARKER = ".flowline-demo"
FLAG_NAMES = {0: "OK", 1: "WATCH", 2: "DEGRADING", 3: "CRITICAL"}


def ensure_packages(console: Console) -> None:
    """Install Debian's influxdb and mosquitto when missing and we may; otherwise say how."""
    missing = [
        pkg for binary, pkg in (("influxd", "influxdb"), ("mosquitto", "mosquitto")) if not _has(binary)
    ]
    if not missing:
        return
    apt = shutil.which("apt-get")
    can_install = apt is not None and (os.geteuid() == 0 or shutil.which("sudo") is not None)
    if not can_install:
        raise ServiceError(
            f"missing {', '.join(missing)}: install the Debian/Ubuntu package(s) with "
            f"'sudo apt-get install {' '.join(missing)}' and run the demo again"
        )
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    console.print(f"Installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*prefix, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*prefix, "apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def _has(binary: str) -> bool:
    return shutil.which(binary) is not None or Path(f"/usr/sbin/{binary}").exists()


def _reset_workdir(workdir: Path) -> None:
    if workdir.exists():
        if not (workdir / MARKER).exists() and any(workdir.iterdir()):
            raise click.UsageError(
                f"{workdir} exists and is not a Flowline demo folder; choose another --workdir"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("created by flowline demo; deleted and re-created by the next run\n")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@click.command()
@click.option(
    "--duration",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds of live streaming after history has landed and analytics ran.",
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path(".flowline-demo"),
    show_default=True,
    help="Folder for servers, spools, logs, dashboards and the report (re-created each run).",
)
@click.option(
    "--site",
    "site_file",
    type=click.Path(exists=True, path_type=Path),
    default=EXAMPLE_SITE,
    help="Site file (default: the bundled north-field example).",
)
@click.option(
    "--seed", type=int, default=7, show_default=True, help="Simulator seed (which faults, how fast)."
)
@click.option(
    "--backfill-days",
    type=float,
    default=14.0,
    show_default=True,
    help="Days of history the simulator writes through the pipeline before going live.",
)
@click.option(
    "--backfill-step",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds between backfilled samples.",
)
def demo(
    duration: float, workdir: Path, site_file: Path, seed: int, backfill_days: float, backfill_step: float
) -> None:
    """Run the whole pipeline on this machine and report what landed and which assets are degrading.

    Starts local InfluxDB and Mosquitto (installing Debian's packages if missing), the plant
    simulator with backfilled history, both collectors, the OT sender, DMZ gateway and writer,
    one analytics pass, exports the dashboards, streams live data for --duration seconds, and
    prints points per asset, end-to-end lag and the degrading assets. Ctrl-C stops everything.

    \b
    Examples:
      flowline demo                       # 14 days of history, then 60 s live
      flowline demo --duration 300 --seed 3
    """
    console = Console()
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT explicitly: a parent may have set it to ignore
        signal.signal(signum, _raise_interrupt)
    try:
        ensure_packages(console)
    except (ServiceError, subprocess.CalledProcessError) as exc:
        raise click.ClickException(str(exc)) from exc
    _reset_workdir(workdir)
    options = StackOptions(
        site_file=site_file, seed=seed, backfill_days=backfill_days, backfill_step_s=backfill_step
    )
    stack = LocalStack(workdir, options)
    started = time.monotonic()
    try:
        _run(console, stack, duration)
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted: stopping every stage…[/yellow]")
    except (ServiceError, TimeoutError, subprocess.CalledProcessError) as exc:
        console.print(f"[red]Demo failed:[/red] {exc}")
        console.print(f"Logs are in {stack.logs_dir}")
        stack.stop()
        sys.exit(1)
    finally:
        stack.stop()
    console.print(f"Stopped cleanly after {time.monotonic() - started:.0f} s. Everything is in {workdir}.")


def _step(console: Console, text: str) -> None:
    console.print(f"[bold cyan]›[/bold cyan] {text}")


def _run(console: Console, stack: LocalStack, duration: float) -> None:
    _step(console, "Starting InfluxDB (auth on) and Mosquitto (TLS, passwords) on free loopback ports")
    stack.prepare()
    stack.start_services()
    stack.write_config()
    opts = stack.options
    if opts.backfill_days > 0:
        _step(console, f"Backfilling {opts.backfill_days:g} days of plant history into the OT spool")
        stack.backfill()
    _step(console, "Starting relay (DMZ gateway, writer, OT sender), simulator and collectors")
    stack.start_pipeline()

    expected = _expected_backfill_points(stack)
    if expected:
        _wait_with_progress(
            console,
            stack,
            "History crossing the DMZ into InfluxDB",
            "SELECT count(quality) FROM telemetry WHERE origin = 'backfill'",
            expected,
            timeout=900,
        )
    _step(console, "Waiting for live values from both collectors (OPC UA and MQTT)")
    stack.wait_for(
        "SELECT count(quality) FROM telemetry WHERE time > now() - 2m AND origin != 'backfill' GROUP BY \"asset\"",
        lambda rows: len(rows) >= 2,
        timeout=120,
        what="live telemetry from the collectors",
    )

    _step(console, "Running one analytics pass (forecasts, time to alarm limit, health flags)")
    _run_cli(
        stack,
        [
            "analyze",
            "--config",
            str(stack.config_path),
            "--once",
            "--report",
            str(stack.workdir / "report.png"),
        ],
    )
    _step(console, "Exporting Grafana dashboards")
    _run_cli(stack, ["dashboards", "export", "--out", str(stack.workdir / "dashboards")])

    if duration > 0:
        _stream(console, stack, duration)
    _report(console, stack)


def _expected_backfill_points(stack: LocalStack) -> int:
    from flowline.inventory import load_site

    tags = len(load_site(stack.options.site_file).iter_tags())
    samples = int(stack.options.backfill_days * 86400 / stack.options.backfill_step_s)
    return tags * samples


def _count(stack: LocalStack, q: str) -> int:
    rows = stack.query(q)
    return int(sum(v for row in rows for k, v in row.items() if k.startswith("count") and v))


def _wait_with_progress(
    console: Console, stack: LocalStack, label: str, q: str, expected: int, timeout: float
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(label, total=expected)
        while True:
            landed = _count(stack, q)
            progress.update(task, completed=min(landed, expected))
            if landed >= expected:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: only {landed} of {expected} points after {timeout:.0f} s")
            _check_stages(stack)
            time.sleep(1.0)


def _check_stages(stack: LocalStack) -> None:
    for name, process in stack.stages.items():
        if not process.running:
            raise ServiceError(f"stage {name} exited; log tail:\n{process.log_tail()}")


def _run_cli(stack: LocalStack, args: list[str]) -> None:
    log = stack.logs_dir / f"{args[0]}.log"
    with open(log, "ab") as out:
        result = subprocess.run(
            [sys.executable, "-m", "flowline.core", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=stack.env(),
            check=False,
        )
    if result.returncode != 0:
        raise ServiceError(
            f"'flowline {' '.join(args[:2])}' failed (exit {result.returncode}); "
            f"log tail:\n{log.read_text(errors='replace')[-2000:]}"
        )


def _stream(console: Console, stack: LocalStack, duration: float) -> None:
    _step(console, f"Streaming live for {duration:.0f} s (Ctrl-C to stop early)")
    end = time.monotonic() + duration
    while time.monotonic() < end:
        _check_stages(stack)
        live = _count(
            stack, "SELECT count(quality) FROM telemetry WHERE time > now() - 10s AND origin != 'backfill'"
        )
        console.print(f"  live: {live / 10:.0f} points/s landed, lag {_lag_s(stack):.2f} s", highlight=False)
        time.sleep(min(5.0, max(end - time.monotonic(), 0.0)))


def _lag_s(stack: LocalStack) -> float:
    """End-to-end lag: now minus the newest live telemetry timestamp in InfluxDB."""
    rows = stack.query("SELECT last(quality) FROM telemetry WHERE time > now() - 5m AND origin != 'backfill'")
    if not rows:
        return float("nan")
    return max(time.time() - float(rows[0]["time"]) / 1e9, 0.0)


def landed_per_asset(stack: LocalStack) -> dict[str, int]:
    rows = stack.query('SELECT count(quality) FROM telemetry GROUP BY "asset"')
    return {row["asset"]: int(row["count"]) for row in rows}


def degrading_assets(stack: LocalStack) -> list[dict[str, Any]]:
    """The latest assessment of every tag whose flag is DEGRADING or worse, ranked by risk.

    The whole latest row is read (not ``last()`` per field), so a field the latest pass left out,
    such as ``hours_to_alarm`` when no crossing is forecast, is not filled from an older pass.
    """
    rows = stack.query('SELECT * FROM asset_health GROUP BY "asset", "tag" ORDER BY time DESC LIMIT 1')
    flagged = [r for r in rows if r.get("flag_level") is not None and int(r["flag_level"]) >= 2]
    return sorted(flagged, key=lambda r: -(r.get("risk") or 0.0))


def _report(console: Console, stack: LocalStack) -> None:
    per_asset = landed_per_asset(stack)
    table = Table(title=f"Points landed in InfluxDB (database {DATABASE})")
    table.add_column("asset")
    table.add_column("points", justify="right")
    for asset, count in sorted(per_asset.items()):
        table.add_row(asset, f"{count:,}")
    table.add_row("[bold]total[/bold]", f"[bold]{sum(per_asset.values()):,}[/bold]")
    console.print(table)
    console.print(f"End-to-end lag (newest live value): {_lag_s(stack):.2f} s")

    flagged = degrading_assets(stack)
    risk = Table(title="Degrading assets (flag DEGRADING or worse), ranked by risk")
    for column in (
        "asset",
        "tag",
        "criticality",
        "flag",
        "hours to alarm",
        "P(cross in horizon)",
        "trend/day",
        "health",
    ):
        risk.add_column(column)
    for r in flagged:
        risk.add_row(
            r["asset"],
            r["tag"],
            r.get("criticality", ""),
            FLAG_NAMES.get(int(r["flag_level"]), "?"),
            _fmt(r.get("hours_to_alarm"), "{:.0f}"),
            _fmt(r.get("p_cross"), "{:.2f}"),
            _fmt(r.get("trend_per_day"), "{:+.3g}"),
            _fmt(r.get("health_score"), "{:.0f}"),
        )
    console.print(risk if flagged else "No asset is degrading.")
    summary = {
        "points_per_asset": per_asset,
        "degrading": [{"asset": r["asset"], "tag": r["tag"]} for r in flagged],
    }
    (stack.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    report = stack.workdir / "report.png"
    if report.exists():
        console.print(f"PNG report of the flagged assets: {report}")
    console.print(f"Dashboards (Grafana JSON): {stack.workdir / 'dashboards'}; config: {stack.config_path}")


def _fmt(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)
