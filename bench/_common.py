"""Helpers shared by every benchmark: where results go and how a machine is described."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """E.g. ``"host 2 cores 24 GiB"``: enough to tell figures from different machines apart."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem = f" {round(pages / (1 << 30))} GiB"
    except (ValueError, OSError):
        mem = ""
    return f"{platform.node()} {os.cpu_count()} cores{mem}"


def write_results(name: str, figures: Mapping[str, float | int | str]) -> Path:
    """Write ``bench/results/<name>.json``: the figures plus ``date`` and ``machine``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {**figures, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine()}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return path


def print_figures(name: str, figures: Mapping[str, float | int | str]) -> Path:
    """Print the figures one per line, aligned, write them (`write_results`) and say where."""
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    path = write_results(name, figures)
    print(f"-> {path}")
    return path


def repo_on_path() -> Path:
    """Let a benchmark run as ``python bench/x.py`` import the repo's test rigs (``tests.*``)."""
    import sys

    root = RESULTS.parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root
