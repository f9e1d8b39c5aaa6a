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
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from flowline.lab.services import ServiceError
from flowline.lab.stack import DATABASE, EXAMPLE_SITE, KeptStack, LocalStack, StackOptions

MARKER = ".flowline-demo"
DEFAULT_WORKDIR = Path(".flowline-demo")  # the data scientist's API looks for its flowline.yaml too
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
    kept = KeptStack.load(workdir)
    if kept is not None and kept.running:
        raise click.UsageError(
            f"a demo stack is still running in {workdir} (pids {', '.join(str(p.pid) for p in kept.running)}): "
            f"stop it first with 'flowline stack down --workdir {workdir}'"
        )
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
    default=DEFAULT_WORKDIR,
    show_default=True,
    help="Folder for servers, spools, logs, dashboards and the report (re-created each run).",
)
@click.option(
    "--keep",
    is_flag=True,
    help="Leave InfluxDB, Mosquitto, the plant and the pipeline running after the report "
    "(stop them with 'flowline stack down').",
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
    duration: float,
    workdir: Path,
    site_file: Path,
    seed: int,
    backfill_days: float,
    backfill_step: float,
    keep: bool = False,
) -> None:
    """Run the whole pipeline on this machine and report what landed and which assets are degrading.

    Starts local InfluxDB and Mosquitto (installing Debian's packages if missing), the plant
    simulator with backfilled history, both collectors, the OT sender, DMZ gateway and writer,
    one analytics pass, exports the dashboards, streams live data for --duration seconds, and
    prints points per asset, end-to-end lag and the degrading assets. Ctrl-C stops everything.
    With --keep everything stays up for notebooks, `flowline export` and Grafana until
    `flowline stack down`.

    \b
    Examples:
      flowline demo                       # 14 days of history, then 60 s live
      flowline demo --duration 300 --seed 3
      flowline demo --keep --duration 0   # leave the stack running (flowline stack status|down)
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
    kept = False
    try:
        _run(console, stack, duration)
        if keep:
            stack.save_state(started_at=time.time())
            kept = True
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted: stopping every stage…[/yellow]")
    except (ServiceError, TimeoutError, subprocess.CalledProcessError) as exc:
        console.print(f"[red]Demo failed:[/red] {exc}")
        console.print(f"Logs are in {stack.logs_dir}")
        stack.stop()
        sys.exit(1)
    finally:
        if not kept:
            stack.stop()
    if kept:
        # The stages run in their own sessions, so they outlive this process and its terminal.
        console.print(
            f"The stack is still running (InfluxDB {stack.influx.url}). Notebooks, the README's snippet and "
            f"'flowline export' find it through {stack.config_path}.\n"
            f"  flowline stack status --workdir {workdir}   # is it up?\n"
            f"  flowline stack down --workdir {workdir}     # stop it"
        )
        return
    console.print(f"Stopped cleanly after {time.monotonic() - started:.0f} s. Everything is in {workdir}.")


def _step(console: Console, text: str) -> None:
    console.print(f"[bold cyan]›[/bold cyan] {text}")


def _run(console: Console, stack: LocalStack, duration: float) -> None:
    _step(console, "Starting InfluxDB (auth on) and Mosquitto (TLS, passwords) on free loopback ports")
    stack.prepare()
    stack.start_services()
    stack.write_config()
    _write_events(stack)
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
    _step(console, "Rolling history up to the hourly tier (the dashboards' 90-day panel)")
    # Only the hourly tier: it is what the dashboards read, and the per-minute one would take longer
    # than the rest of the demo to roll up weeks of history on a small machine.
    _run_cli(stack, ["historian", "rollup", "--config", str(stack.config_path), "--once", "--tier", "1h"])
    _step(console, "Exporting Grafana dashboards and alert rules (from the site file)")
    _run_cli(
        stack,
        [
            *("dashboards", "export", "--config", str(stack.config_path)),
            *("--out", str(stack.workdir / "dashboards")),
            *("--alerting-out", str(stack.workdir / "alerting")),
        ],
    )

    if duration > 0:
        _stream(console, stack, duration)
    _report(console, stack)


def _write_events(stack: LocalStack) -> None:
    """The simulator's ground truth as a work-order export: when each injected fault reaches its
    alarm limit. What a backtest scores lead times and misses against (docs/data-science.md)."""
    from flowline.inventory import load_site
    from flowline.lab.sim.plant import Plant

    plant = Plant(load_site(stack.options.site_file), stack.options.seed, epoch_ns=stack.epoch_ns)
    lines = ["time,asset,tag,kind"]
    for fault in plant.faults:
        when = datetime.fromtimestamp(fault.crossing_ns / 1e9, tz=UTC).isoformat(timespec="seconds")
        lines.append(f"{when},{fault.asset},{fault.tag},{fault.kind.value}")
    (stack.workdir / "events.csv").write_text("\n".join(lines) + "\n")


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


def analytics_incomplete(stack: LocalStack) -> str | None:
    """What the analytics pass could not assess, from its status file; None when it assessed everything."""
    from flowline.core.status import read_status, status_dir

    doc = read_status(status_dir(stack.data_dir) / "analytics.json")
    last_pass = (doc.get("extra") or {}).get("last_pass")
    if not isinstance(last_pass, dict):
        return "the analytics pass left no result (did it run?)"
    if "error" in last_pass:
        return f"the analytics pass failed: {last_pass['error']}"
    note = last_pass.get("not_assessed")
    return str(note) if note else None


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
    incomplete = analytics_incomplete(stack)
    if flagged:
        console.print(risk)
    elif incomplete is None:
        console.print("No asset is degrading.")
    if incomplete is not None:
        # A skipped or failed pass is not good news: say what is unknown instead of "no asset is degrading".
        console.print(
            f"[bold yellow]Analytics incomplete: {incomplete}; the health of those assets is unknown "
            f"(details in {stack.logs_dir / 'analyze.log'}).[/bold yellow]",
            highlight=False,
        )
    summary = {
        "points_per_asset": per_asset,
        "degrading": [{"asset": r["asset"], "tag": r["tag"]} for r in flagged],
        "analytics_incomplete": incomplete,
    }
    (stack.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    report = stack.workdir / "report.png"
    if report.exists():
        console.print(f"PNG report of the flagged assets: {report}")
    console.print(f"Dashboards (Grafana JSON): {stack.workdir / 'dashboards'}; config: {stack.config_path}")
    alerting = stack.workdir / "alerting" / "alerting.yaml"
    # soft_wrap: a path is never folded across lines, so it can be copied (or read by a script).
    console.print(f"Alert rules, contact points and policy (Grafana provisioning): {alerting}", soft_wrap=True)


def _fmt(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


# --- flowline stack: the demo stack left running ----------------------------------------------------

_workdir_option = click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=DEFAULT_WORKDIR,
    show_default=True,
    help="The demo's folder.",
)


@click.group()
def stack() -> None:
    """The demo stack kept running for notebooks and exports: up, status, down."""


@stack.command("up")
@_workdir_option
@click.option("--seed", type=int, default=7, show_default=True, help="Simulator seed.")
@click.option("--backfill-days", type=float, default=14.0, show_default=True, help="Days of history.")
@click.option("--backfill-step", type=float, default=300.0, show_default=True, help="Seconds between samples.")
@click.pass_context
def stack_up(ctx: click.Context, workdir: Path, seed: int, backfill_days: float, backfill_step: float) -> None:
    """Run the demo and leave it running (flowline demo --keep --duration 0); a no-op when it is up."""
    kept = KeptStack.load(workdir)
    if kept is not None and kept.running and len(kept.running) == len(kept.processes):
        click.echo(f"already up: {len(kept.processes)} processes, config {kept.config}")
        return
    if kept is not None:
        kept.stop()  # partly down: start again from a clean state
    ctx.invoke(
        demo, duration=0.0, workdir=workdir, site_file=EXAMPLE_SITE, seed=seed, backfill_days=backfill_days,
        backfill_step=backfill_step, keep=True,
    )


@stack.command("status")
@_workdir_option
def stack_status(workdir: Path) -> None:
    """Show the kept stack's processes, config and InfluxDB; exit 1 unless every process runs."""
    kept = _load_kept(workdir)
    table = Table(title=f"Flowline demo stack in {workdir}")
    for column in ("process", "pid", "state"):
        table.add_column(column)
    for process in kept.processes:
        table.add_row(process.name, str(process.pid), "running" if process.running else "[red]stopped[/red]")
    console = Console()
    console.print(table)
    console.print(f"config: {kept.config}\nInfluxDB: {kept.influx_url} ({_ping(kept.influx_url)})")
    down = [p.name for p in kept.processes if not p.running]
    if down:
        raise click.ClickException(
            f"not running: {', '.join(down)}; restart with 'flowline stack down --workdir {workdir}' "
            f"then 'flowline stack up --workdir {workdir}' (logs in {workdir / 'logs'})"
        )


@stack.command("down")
@_workdir_option
def stack_down(workdir: Path) -> None:
    """Stop every process of the kept stack, upstream first; its data stays in the workdir."""
    kept = _load_kept(workdir)
    running = len(kept.running)
    killed = kept.stop()
    forced = f" ({', '.join(killed)} needed SIGKILL)" if killed else ""
    click.echo(f"stopped {running} process(es){forced}; data kept in {workdir}")


def _load_kept(workdir: Path) -> KeptStack:
    try:
        kept = KeptStack.load(workdir)
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from exc
    if kept is None:
        raise click.ClickException(
            f"no stack is kept running in {workdir}: start one with 'scripts/demo --keep' "
            "(or 'flowline stack up')"
        )
    return kept


def _ping(url: str) -> str:
    import requests

    try:
        return "answering" if requests.get(f"{url}/ping", timeout=2).status_code == 204 else "not answering"
    except requests.RequestException:
        return "unreachable"
