"""Deterministic plant model: realistic, vectorised signals for every tag of a site.

A tag's value at time t is::

    normal * (1 + load_gain * (load(asset, t) - 1))      throughput: flow, power, current, pressure
    + ambient_gain * ambient(t)                            temperatures follow the day
    + fault offset (faults.py)                             only on the three faulty tags
    + noise                                                 Gaussian, clipped at 4 sigma

``load`` is one per-asset signal (a daily cycle plus slow smooth variation), so related tags of an
asset move together. Some tags are computed from others as the plant's physics says
(exchanger outlet = cooling water inlet + approach; filter outlet = inlet - differential pressure),
so a fault shows up coherently. Noise is a counter-based hash of (seed, tag, second): the value at
an instant does not depend on which array it is computed in, so the backfill and the live server
agree. Healthy tags stay well within their alarm limits by construction (margins checked in tests).

Usage::

    plant = Plant(site, seed=7, epoch_ns=time.time_ns())
    plant.faults                          # ground truth, see faults.py
    plant.series("P-102", "vibration_rms", times_ns)   # np.ndarray of float64
    plant.value("P-102", "vibration_rms", t_ns)        # one float
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from flowline.core.errors import FlowlineError
from flowline.inventory import Asset, Site, Tag
from flowline.lab.sim.faults import NS_PER_DAY, Fault, make_faults

NS_PER_S = 10**9
NOISE_CLIP_SIGMA = 4.0
LOAD_DAILY_AMPLITUDE = 0.06  # +-6 % throughput over the day (export nominations, gas demand)
LOAD_SMOOTH_AMPLITUDE = 0.02
AMBIENT_AMPLITUDE_C = 6.0  # +-6 degC between night and afternoon


@dataclass(frozen=True)
class Behaviour:
    """How a kind of signal responds: to throughput (relative), to ambient (degC/degC), noise (relative)."""

    load_gain: float
    ambient_gain: float
    noise: float


# By unit: the physics of what a unit measures is a good first guess of how it behaves.
_BY_UNIT: dict[str, Behaviour] = {
    "degC": Behaviour(0.05, 0.35, 0.0025),
    "K": Behaviour(0.3, 0.0, 0.01),
    "mm/s": Behaviour(0.15, 0.0, 0.03),
    "um": Behaviour(0.15, 0.0, 0.03),
    "g": Behaviour(0.15, 0.0, 0.03),
    "barg": Behaviour(0.08, 0.0, 0.006),
    "bar": Behaviour(0.08, 0.0, 0.006),
    "m3/h": Behaviour(1.0, 0.0, 0.01),
    "Sm3/h": Behaviour(1.0, 0.0, 0.01),
    "kW": Behaviour(1.0, 0.0, 0.01),
    "A": Behaviour(1.0, 0.0, 0.01),
    "rpm": Behaviour(0.35, 0.0, 0.0015),
    "Hz": Behaviour(0.35, 0.0, 0.0015),
    "%": Behaviour(0.3, 0.0, 0.015),
}
_DEFAULT = Behaviour(0.1, 0.0, 0.01)
# Differential pressure across a restriction grows with the square of flow.
_DP = Behaviour(1.5, 0.0, 0.01)
# (asset type, tag) -> (tag a, sign, tag b): value = a + sign * b, noise added once.
_DERIVED: dict[tuple[str, str], tuple[str, float, str]] = {
    ("shell_and_tube_exchanger", "hot_out_temp"): ("cold_in_temp", 1.0, "approach_temp"),
    ("filter_coalescer", "outlet_pressure"): ("inlet_pressure", -1.0, "differential_pressure"),
}
# A worn bearing runs warmer: extra degC at the vibration fault's crossing (well below 95 degC alarm).
_SYMPATHETIC: dict[tuple[str, str], tuple[str, float]] = {
    ("centrifugal_pump", "bearing_temp"): ("vibration_rms", 6.0),
}


class PlantError(FlowlineError):
    """Unknown asset or tag."""


def behaviour(tag: Tag) -> Behaviour:
    if tag.name.endswith("_dp") or tag.name == "differential_pressure":
        return _DP
    return _BY_UNIT.get(tag.unit or "", _DEFAULT)


def normal_value(tag: Tag) -> float:
    """The tag's operating point: ``normal`` from the site file, else a safe point between its limits."""
    if tag.normal is not None:
        return tag.normal
    alarm = tag.alarm
    high = alarm.high if alarm and alarm.high is not None else None
    low = alarm.low if alarm and alarm.low is not None else None
    if high is not None and low is not None:
        return (high + low) / 2
    if high is not None:
        return 0.5 * high if high > 0 else high - 10.0
    if low is not None:
        return 2.0 * low if low > 0 else low + 10.0
    return 50.0


def _mix(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """splitmix64 finaliser: a good 64-bit hash, vectorised (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(key: int, seconds: NDArray[np.int64]) -> NDArray[np.float64]:
    h = _mix(seconds.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def gaussian(key: int, times_ns: NDArray[np.int64]) -> NDArray[np.float64]:
    """Standard normal noise as a pure function of (key, whole second), clipped at 4 sigma."""
    seconds = times_ns // NS_PER_S
    u1, u2 = _uniform(key, seconds), _uniform(key ^ 0x5DEECE66D, seconds)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return np.asarray(np.clip(z, -NOISE_CLIP_SIGMA, NOISE_CLIP_SIGMA), dtype=np.float64)


def _key(seed: int, *names: str) -> int:
    return (seed * 0x100000001B3 + zlib.crc32("/".join(names).encode())) & 0xFFFFFFFFFFFFFFFF


class Plant:
    """The plant model of ``site`` for ``seed``; faults are timed relative to ``epoch_ns`` ("now")."""

    def __init__(
        self,
        site: Site,
        seed: int = 0,
        epoch_ns: int | None = None,
        faults: Sequence[Fault] | None = None,
    ) -> None:
        self.site = site
        self.seed = seed
        self.epoch_ns = time.time_ns() if epoch_ns is None else int(epoch_ns)
        self.faults: list[Fault] = make_faults(site, seed, self.epoch_ns) if faults is None else list(faults)
        self._faults = {(f.asset, f.tag): f for f in self.faults}
        rng = np.random.default_rng([seed, 0x91A7])
        # The daily cycle is plant-wide (one export nomination and gas demand drive every unit, so
        # pumps, pipeline and separator flows move together); per asset a small lag (hours) and
        # three slow components (period h, phase) of its own.
        self._load_params = {
            asset.id: (rng.uniform(0.0, 0.5), rng.uniform(2.0, 9.0, 3), rng.uniform(0, 2 * np.pi, 3))
            for asset in site.assets
        }

    # --- ground truth -------------------------------------------------------------------------
    @property
    def faulty_assets(self) -> set[str]:
        return {f.asset for f in self.faults}

    def fault(self, asset: str, tag: str) -> Fault | None:
        return self._faults.get((asset, tag))

    # --- signals ------------------------------------------------------------------------------
    def series(self, asset: str, tag: str, times_ns: ArrayLike) -> NDArray[np.float64]:
        """Values of ``asset``/``tag`` at ``times_ns`` (int64 nanoseconds since the Unix epoch)."""
        _, t = self._lookup(asset, tag)
        times = np.asarray(times_ns, dtype=np.int64)
        scale = abs(normal_value(t)) or 1.0
        noise = behaviour(t).noise * scale * gaussian(_key(self.seed, asset, tag), times)
        return self.expected(asset, tag, times) + noise

    def value(self, asset: str, tag: str, t_ns: int) -> float:
        return float(self.series(asset, tag, np.array([t_ns], dtype=np.int64))[0])

    def expected(self, asset: str, tag: str, times_ns: ArrayLike) -> NDArray[np.float64]:
        """The noise-free value (daily cycle, coupling and faults included)."""
        a, t = self._lookup(asset, tag)
        times = np.asarray(times_ns, dtype=np.int64)
        derived = _DERIVED.get((a.type, t.name))
        if derived is not None and all(self.site.tag(asset, name) for name in (derived[0], derived[2])):
            first, sign, second = derived
            return self.expected(asset, first, times) + sign * self.expected(asset, second, times)
        b = behaviour(t)
        normal = normal_value(t)
        value = normal * (1.0 + b.load_gain * (self.load(asset, times) - 1.0))
        if b.ambient_gain:
            value = value + b.ambient_gain * self.ambient(times)
        fault = self._faults.get((asset, tag))
        if fault is not None:
            value = value + fault.offset(times)
        sympathetic = _SYMPATHETIC.get((a.type, t.name))
        if sympathetic is not None and (cause := self._faults.get((asset, sympathetic[0]))) is not None:
            value = value + sympathetic[1] * np.minimum(cause.progress(times), 1.5)
        return np.asarray(value, dtype=np.float64)

    def load(self, asset: str, times_ns: NDArray[np.int64]) -> NDArray[np.float64]:
        """Relative throughput of ``asset`` (1.0 = design): daily cycle peaking mid-afternoon plus slow drift."""
        phase_h, periods_h, phases = self._load_params[asset]
        hours = (times_ns % NS_PER_DAY) / 3.6e12
        daily = np.sin(2 * np.pi * (hours - 9.0 - phase_h) / 24.0)
        absolute_h = times_ns / 3.6e12
        smooth = sum(np.sin(2 * np.pi * absolute_h / p + ph) for p, ph in zip(periods_h, phases, strict=True)) / 3
        return np.asarray(1.0 + LOAD_DAILY_AMPLITUDE * daily + LOAD_SMOOTH_AMPLITUDE * smooth, dtype=np.float64)

    @staticmethod
    def ambient(times_ns: NDArray[np.int64]) -> NDArray[np.float64]:
        """Ambient temperature deviation from the daily mean (degC): coolest at dawn, warmest at 15:00 UTC."""
        hours = (times_ns % NS_PER_DAY) / 3.6e12
        return np.asarray(AMBIENT_AMPLITUDE_C * np.sin(2 * np.pi * (hours - 9.0) / 24.0), dtype=np.float64)

    def _lookup(self, asset: str, tag: str) -> tuple[Asset, Tag]:
        a = self.site.assets_by_id.get(asset)
        t = self.site.tag(asset, tag)
        if a is None or t is None:
            raise PlantError(f"no tag {asset}/{tag} in site {self.site.site}")
        return a, t
