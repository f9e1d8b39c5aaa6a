"""Durable file replacement: the one way Flowline rewrites a state file (checkpoints, journals, status).

`atomic_write_bytes` writes a temporary file beside the target, fsyncs it, renames it over the
target and fsyncs the folder, so after a crash or power loss the target is either the old or the
new content, never a mix, and the rename itself has reached the disk. ``durable=False`` skips both
fsyncs for files that are only ever advisory (a status file a person reads): atomic, not durable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (POSIX needs the directory fsynced too)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: Path, value: object, *, durable: bool = True) -> None:
    atomic_write_bytes(path, json.dumps(value, sort_keys=True).encode("utf-8"), durable=durable)
