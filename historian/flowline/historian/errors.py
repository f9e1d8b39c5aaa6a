"""Exceptions of the historian package, shared by the writer, the readers and the set-up code."""

from __future__ import annotations

from flowline.core.errors import FlowlineError, NeedsOperatorError


class HistorianError(FlowlineError):
    """Base class: something went wrong talking to InfluxDB."""


class HistorianAuthError(HistorianError, NeedsOperatorError):
    """401/403: the credential is wrong, missing or lacks the privilege. Retrying cannot help."""


class HistorianUnavailableError(HistorianError):
    """InfluxDB did not accept the data before the retry deadline (5xx, 429, network errors).

    Nothing is lost: the caller keeps the points in its spool and replays them later (writes are
    idempotent, so points of the batch that did land are simply rewritten).
    """


class HistorianNotFoundError(HistorianError, NeedsOperatorError):
    """The database, retention policy or bucket does not exist (a deployment error, not bad data)."""


class HistorianQueryError(HistorianError):
    """InfluxDB rejected an InfluxQL statement (syntax, unknown function, ...)."""
