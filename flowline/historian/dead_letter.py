"""A bounded dead-letter file: points InfluxDB refused, kept aside with the server's reason.

JSON lines ``{"time": ISO-8601, "reason": …, "status": …, "message": …, "line": …}``. When the
file reaches half of ``max_bytes`` it is rotated to ``<name>.1`` (replacing the previous one), so
the two files together never hold much more than ``max_bytes`` and the newest rejects are kept.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path


class DeadLetterFile:
    def __init__(self, path: str | Path, max_bytes: int = 64 << 20) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    @property
    def rotated_path(self) -> Path:
        return self.path.with_name(self.path.name + ".1")

    def add(self, line: str, reason: str, message: str, status: int | None = None) -> None:
        record = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "reason": reason,
            "status": status,
            "message": message,
            "line": line,
        }
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size and size + len(data) > self.max_bytes // 2:
                os.replace(self.path, self.rotated_path)
            with open(self.path, "ab") as out:
                out.write(data)

    def records(self) -> list[dict[str, object]]:
        """Every kept record, oldest first (for tests, audits and the CLI)."""
        out: list[dict[str, object]] = []
        for path in (self.rotated_path, self.path):
            if path.exists():
                out += [json.loads(raw) for raw in path.read_text(encoding="utf-8").splitlines() if raw]
        return out
