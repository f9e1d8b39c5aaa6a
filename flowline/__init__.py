"""Flowline: telemetry historian and predictive-maintenance pipeline across the OT/DMZ/IT boundary."""

__version__ = "0.1.0"
