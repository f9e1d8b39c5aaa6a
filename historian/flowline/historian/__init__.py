"""Historian: write points to InfluxDB (line protocol), read them back (InfluxQL -> pandas), roll them up.

Public API: `HistorianWriter`, `WriteResult`, `Connection`, `DeadLetterFile` and the exceptions
`HistorianError`, `HistorianAuthError`, `HistorianUnavailableError`, `HistorianNotFoundError`,
`HistorianQueryError`.
"""

from flowline.core.deadletter import DeadLetterFile
from flowline.historian.connection import Connection
from flowline.historian.errors import (
    HistorianAuthError,
    HistorianError,
    HistorianNotFoundError,
    HistorianQueryError,
    HistorianUnavailableError,
)
from flowline.historian.writer import HistorianWriter, WriteResult

__all__ = [
    "Connection",
    "DeadLetterFile",
    "HistorianAuthError",
    "HistorianError",
    "HistorianNotFoundError",
    "HistorianQueryError",
    "HistorianUnavailableError",
    "HistorianWriter",
    "WriteResult",
]
