"""The project's one exception root.

Every error Flowline raises on purpose derives from `FlowlineError`, so a caller (the CLI above
all) can tell a foreseeable condition, which deserves one clear line, from a bug, which deserves a
traceback. Each component defines specific subclasses next to the code that raises them
(`flowline.historian.errors`, `flowline.relay.frames.FrameError`, …); this module holds only the
root and the few errors every zone shares.
"""

from __future__ import annotations


class FlowlineError(Exception):
    """Something Flowline foresaw: bad input or config, an unreachable or refusing peer, a full disk.

    The message says what, where and what to do; it never contains a secret.
    """


class ConfigError(FlowlineError):
    """The deployment config file is invalid or cannot be read."""


class DependencyError(FlowlineError):
    """An installed library is not the version Flowline was tested with (see `flowline.core.compat`)."""
