"""Bounded dead-letter files: what a stage refused, kept aside with the reason, in one format.

JSON lines: ``{"time": ISO-8601 UTC, "reason": <the flowline_rejected_total label>, "where": …,
"message": …}`` plus what the refused thing was: ``line`` (a line-protocol point InfluxDB refused,
with the HTTP ``status``), ``payload`` (a raw message that is valid UTF-8) or ``payload_b64``
(anything else). When the file would pass half of ``max_bytes`` it is rotated to ``<name>.1``
(replacing the previous one), so the two files together stay within ``max_bytes`` and the newest
rejects are kept. A single record larger than that is cut to fit, marked ``"truncated": true``.
"""

from __future__ import annotations

import base64
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

    def add(
        self,
        reason: str,
        message: str,
        *,
        where: str = "",
        line: str | None = None,
        status: int | None = None,
        payload: bytes | None = None,
    ) -> None:
        record: dict[str, object] = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "reason": reason,
            "where": where,
            "message": message,
        }
        if line is not None:
            record["line"] = line
        if status is not None:
            record["status"] = status
        if payload is not None:
            limit = self.max_bytes // 4
            if len(payload) > limit:
                payload, record["truncated"] = payload[:limit], True
            try:
                record["payload"] = payload.decode("utf-8")
            except UnicodeDecodeError:
                record["payload_b64"] = base64.b64encode(payload).decode("ascii")
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
        """Every kept record, oldest first (for tests, audits and ``flowline historian dead-letter``)."""
        out: list[dict[str, object]] = []
        for path in (self.rotated_path, self.path):
            if path.exists():
                out += [json.loads(raw) for raw in path.read_text(encoding="utf-8").splitlines() if raw]
        return out
