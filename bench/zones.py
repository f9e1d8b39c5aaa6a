"""Per-zone installs: dependency count, size on disk and ``flowline --help`` time for each zone.

Each zone's environment is built from the lock exactly as a host of that zone installs it
(``uv sync --frozen --no-default-groups --no-editable --extra <zone>``) in a temporary folder; then
the installed distributions are counted (Flowline's own and third-party apart), the folder's size is
measured, and ``flowline --help`` is timed (median of 7 runs after one warm-up).

    python bench/zones.py [--quick]     # --quick: 3 timing runs instead of 7
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import distributions
from pathlib import Path

from _common import repo_on_path, write_results

ZONES = ("ot", "dmz", "it")
# Libraries each zone must (not) have, read from the built environment rather than assumed.
PROBES = ("asyncua", "paho", "zfec", "requests", "pandas", "statsmodels", "matplotlib", "grafana_client")


def uv() -> str:
    root = repo_on_path()
    found = shutil.which("uv") or str(root / ".uv" / "bin" / "uv")
    if not Path(found).exists():
        sys.exit("uv not found: run scripts/bootstrap first (it installs uv into .uv/)")
    return found


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def measure(zone: str, workdir: Path, runs: int) -> dict[str, float | int | str]:
    env_dir = workdir / zone
    subprocess.run(
        [uv(), "sync", "--frozen", "--no-default-groups", "--no-editable", "--extra", zone, "--quiet"],
        cwd=repo_on_path(),
        env={**os.environ, "UV_PROJECT_ENVIRONMENT": str(env_dir), "UV_PYTHON_DOWNLOADS": "never"},
        check=True,
    )
    site = next(env_dir.glob("lib/python*/site-packages"))
    names = sorted({d.metadata["Name"].lower() for d in distributions(path=[str(site)])} - {"pip"})
    ours = [n for n in names if n.startswith("flowline-plant")]
    python = str(env_dir / "bin" / "python")
    probe = "import importlib.util as u, sys; print(','.join(m for m in sys.argv[1:] if u.find_spec(m)))"
    present = subprocess.run([python, "-c", probe, *PROBES], capture_output=True, text=True, check=True).stdout.strip()
    flowline = str(env_dir / "bin" / "flowline")
    subprocess.run([flowline, "--help"], capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([flowline, "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return {
        f"{zone}_distributions": len(names),
        f"{zone}_third_party_distributions": len(names) - len(ours),
        f"{zone}_size_mib": round(folder_bytes(env_dir) / (1 << 20), 1),
        f"{zone}_help_s": round(statistics.median(times), 3),
        f"{zone}_has": present,
        f"{zone}_components": ",".join(n.removeprefix("flowline-plant-") for n in ours if n != "flowline-plant"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing runs")
    args = parser.parse_args()
    figures: dict[str, float | int | str] = {}
    with tempfile.TemporaryDirectory(prefix="flowline-zones-") as tmp:
        for zone in ZONES:
            figures.update(measure(zone, Path(tmp), 3 if args.quick else 7))
    print(f"{'zone':<5} {'deps (3rd party)':>17} {'size MiB':>9} {'--help s':>9}  components / libraries present")
    for zone in ZONES:
        print(
            f"{zone:<5} {figures[f'{zone}_distributions']:>6} ({figures[f'{zone}_third_party_distributions']:>3})"
            f"       {figures[f'{zone}_size_mib']:>9} {figures[f'{zone}_help_s']:>9}  "
            f"{figures[f'{zone}_components']} / {figures[f'{zone}_has']}"
        )
    print(f"wrote {write_results('zones', figures)}")


if __name__ == "__main__":
    main()
