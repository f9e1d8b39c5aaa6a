"""The project's one exception root.

Every error Flowline raises on purpose derives from `FlowlineError`, so a caller (the CLI above
all) can tell a foreseeable condition, which deserves one clear line, from a bug, which deserves a
traceback. Each component defines specific subclasses next to the code that raises them
(`flowline.historian.errors`, `flowline.relay.frames.FrameError`, …); this module holds only the
root and the few errors every zone shares, and `network_reason`, which puts an HTTP client's
error in a few words.
"""

from __future__ import annotations

import re

_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


class FlowlineError(Exception):
    """Something Flowline foresaw: bad input or config, an unreachable or refusing peer, a full disk.

    The message says what, where and what to do; it never contains a secret.
    """


class NeedsOperatorError(FlowlineError):
    """A person must act (fix a credential, create a database): retrying cannot help.

    Long-running commands exit with status 2 on it; the systemd units list 2 in
    ``RestartPreventExitStatus`` so such a process is not restarted in a loop.
    """


class ConfigError(FlowlineError):
    """The deployment config file is invalid or cannot be read."""


class DependencyError(FlowlineError):
    """An installed library is not the version Flowline was tested with (see `flowline.core.compat`)."""


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
