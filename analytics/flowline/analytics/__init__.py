"""Predictive-maintenance analytics (IT zone).

- `assess`: per-series assessment (pandas in, `Assessment` out): forecast, hours to alarm limit,
  probability of crossing, trend significance, anomaly, health score, flag, risk.
- `rules`: the flag vocabulary (`Flag`) and the configurable rules (`AssessmentRules`).
- `job`: the ``flowline analyze`` pass (InfluxDB in and out, process pool or Dask).
- `api`: the data scientist's API (load history with quality, assess, plot, PNG report).
- `detect`: causal row-by-row scoring (``flowline detect``).
- `synthetic`: series with known truth for tests, benches and examples.
"""
