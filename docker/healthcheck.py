"""Container health check for Flowline services (no listening socket needed: OT services have none).

Healthy when the service's main process is alive and not a zombie, the config still loads, and the
data folder (spools, state) is writable. The services themselves exit non-zero on fatal errors, so
together with ``restart: unless-stopped`` this catches the hung or mis-mounted cases.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def main() -> int:
    try:
        state = Path("/proc/1/stat").read_text().split(")")[-1].split()[0]
    except OSError as exc:
        print(f"unhealthy: cannot read the main process state: {exc}")
        return 1
    if state in ("Z", "X"):
        print("unhealthy: main process is a zombie")
        return 1
    from flowline.core.errors import ConfigError
from flowline.core.config import load_config

    try:
        config = load_config(os.environ.get("FLOWLINE_CONFIG", "/etc/flowline/flowline.yaml"))
    except ConfigError as exc:
        print(f"unhealthy: {exc}")
        return 1
    try:
        with tempfile.NamedTemporaryFile(dir=config.data_dir, prefix=".health-"):
            pass
    except OSError as exc:
        print(f"unhealthy: data folder {config.data_dir} is not writable: {exc.strerror}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
