"""Helpers for turning errors into the one line a person reads (shared by the CLI and the HTTP clients)."""

from __future__ import annotations

import re

_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def network_reason(exc: BaseException) -> str:
    """``connection refused`` out of an HTTP client's "HTTPConnectionPool(host=…): Max retries exceeded
    with url: … (Caused by NewConnectionError(…: [Errno 111] Connection refused'))": the useful part
    is buried at the end of a 300-character message."""
    text = str(exc)
    found = _ERRNO.search(text)
    if found:
        return found.group(1).strip().rstrip(".").lower()
    lowered = text.lower()
    for needle in ("certificate verify failed", "timed out", "name or service not known", "ssl"):
        if needle in lowered:
            return needle
    return type(exc).__name__
