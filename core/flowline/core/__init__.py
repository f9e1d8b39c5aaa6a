"""Flowline: telemetry historian and predictive-maintenance pipeline across the OT/DMZ/IT boundary."""

__version__ = "0.2.0"
