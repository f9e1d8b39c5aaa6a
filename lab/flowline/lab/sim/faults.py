"""Injected faults and their ground truth.

Three assets of the example site degrade (``FAULT_SPECS``):

============  =====================  ===============  ==========================================
asset         tag                    kind             shape of the rise towards the ``high`` limit
============  =====================  ===============  ==========================================
P-102         vibration_rms          bearing_wear     accelerating (exponential): spalling grows
E-201         approach_temp          fouling          falling rate (asymptotic, Kern-Seaton)
F-401         differential_pressure  filter_clogging  power law (cake build-up on the element)
============  =====================  ===============  ==========================================

For a seed and an ``epoch_ns`` ("now", the demo's start) each fault starts 5.5 to 9 days before the
epoch and its expected value (the tag's normal value plus the fault offset, without daily cycle and
noise) reaches the alarm ``high`` limit 2 to 4.5 days after it: ``Fault.crossing_ns``. So an
analytics pass at the epoch over 14 days of history can flag each fault at least 24 h ahead.
Every other asset is healthy.

Other shapes, for benchmarks and what-ifs (``make_faults(..., kinds=...)`` or `fault_for`), each with
the same ground truth (``crossing_ns``: the expected value without daily cycle reaches ``high``):

=================  ==============================================================================
kind               progress(u), u = 0 at the start and 1 at the crossing
=================  ==============================================================================
linear_drift       u: a constant-rate drift (seal leak, slow corrosion)
step_then_drift    a step of ``shape`` (0.2-0.4 of the way) at the start, then linear: fouling
                   after a process upset, a chipped impeller
intermittent       u, but only in bursts (about a third of the time, an hour or two each); half of
                   it between bursts: a loose coupling, cavitation that comes and goes. At the
                   crossing a burst reaches the limit, well before the average level does.
=================  ==============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from flowline.core.errors import FlowlineError
from flowline.inventory import Site

NS_PER_DAY = 86_400 * 10**9


class FaultKind(StrEnum):
    BEARING_WEAR = "bearing_wear"
    FOULING = "fouling"
    FILTER_CLOGGING = "filter_clogging"
    LINEAR_DRIFT = "linear_drift"
    STEP_THEN_DRIFT = "step_then_drift"
    INTERMITTENT = "intermittent"


# (asset, tag, kind): the ground truth of which assets degrade in the example site.
FAULT_SPECS: tuple[tuple[str, str, FaultKind], ...] = (
    ("P-102", "vibration_rms", FaultKind.BEARING_WEAR),
    ("E-201", "approach_temp", FaultKind.FOULING),
    ("F-401", "differential_pressure", FaultKind.FILTER_CLOGGING),
)
START_DAYS_BEFORE = (5.5, 9.0)
CROSSING_DAYS_AFTER = (2.0, 4.5)
# Shape parameter ranges: bearing growth exponent, fouling decay constant, clogging power.
_SHAPE_RANGE = {
    FaultKind.BEARING_WEAR: (1.2, 2.2),
    FaultKind.FOULING: (0.2, 0.7),
    FaultKind.FILTER_CLOGGING: (1.2, 1.6),
    FaultKind.LINEAR_DRIFT: (1.0, 1.0),
    FaultKind.STEP_THEN_DRIFT: (0.2, 0.4),
    FaultKind.INTERMITTENT: (1.0, 1.0),
}
_BURST_LOW = 0.5  # intermittent: fraction of the fault present between bursts


class FaultConfigError(FlowlineError):
    """A fault refers to a tag that does not exist or has no ``high`` alarm limit and ``normal`` value."""


@dataclass(frozen=True)
class Fault:
    """One injected fault: ``offset`` is added to the tag's healthy value."""

    asset: str
    tag: str
    kind: FaultKind
    start_ns: int
    crossing_ns: int  # when normal + offset reaches ``limit``
    normal: float
    limit: float
    shape: float

    def progress(self, times_ns: NDArray[np.int64]) -> NDArray[np.float64]:
        """0 before the start, 1 at the crossing, growing past 1 afterwards (by the fault's law)."""
        u = np.clip((times_ns - self.start_ns) / (self.crossing_ns - self.start_ns), 0.0, None)
        g = self.shape
        if self.kind is FaultKind.BEARING_WEAR:
            return np.asarray(np.expm1(g * u) / np.expm1(g), dtype=np.float64)
        if self.kind is FaultKind.FOULING:
            return np.asarray(-np.expm1(-g * u) / -np.expm1(-g), dtype=np.float64)
        if self.kind is FaultKind.LINEAR_DRIFT:
            return np.asarray(u, dtype=np.float64)
        if self.kind is FaultKind.STEP_THEN_DRIFT:
            return np.asarray(np.where(u > 0, g + (1.0 - g) * u, 0.0), dtype=np.float64)
        if self.kind is FaultKind.INTERMITTENT:
            return np.asarray(u * np.where(bursts(times_ns), 1.0, _BURST_LOW), dtype=np.float64)
        return np.asarray(u**g, dtype=np.float64)

    def offset(self, times_ns: NDArray[np.int64]) -> NDArray[np.float64]:
        return (self.limit - self.normal) * self.progress(times_ns)


def bursts(times_ns: NDArray[np.int64]) -> NDArray[np.bool_]:
    """When an intermittent fault shows in full: two incommensurate cycles (9.7 h and 4.3 h) above a
    level, so bursts last one to two hours, about a third of the time, with no daily period."""
    hours = times_ns / 3.6e12
    return np.asarray(np.sin(2 * np.pi * hours / 9.7) + np.sin(2 * np.pi * hours / 4.3) > 0.8)


def make_faults(
    site: Site, seed: int, epoch_ns: int, kinds: dict[str, FaultKind] | None = None
) -> list[Fault]:
    """The ground truth for ``seed`` and ``epoch_ns``; specs whose asset/tag the site lacks are skipped.
    ``kinds`` (asset -> kind) replaces a spec's shape, same timing (benchmarks of other shapes)."""
    rng = np.random.default_rng([seed, 0xFA17])
    faults = []
    for asset, tag_name, spec_kind in FAULT_SPECS:
        # Draw for every spec, present or not, so one site's faults do not shift another's timing.
        start_days, cross_days = rng.uniform(*START_DAYS_BEFORE), rng.uniform(*CROSSING_DAYS_AFTER)
        u = rng.uniform()
        kind = (kinds or {}).get(asset, spec_kind)
        low, high = _SHAPE_RANGE[kind]
        shape = low + (high - low) * u
        if site.tag(asset, tag_name) is None:
            continue
        faults.append(
            fault_for(
                site,
                asset,
                tag_name,
                kind,
                start_ns=epoch_ns - int(start_days * NS_PER_DAY),
                crossing_ns=epoch_ns + int(cross_days * NS_PER_DAY),
                shape=float(shape),
            )
        )
    return faults


def fault_for(
    site: Site, asset: str, tag_name: str, kind: FaultKind, start_ns: int, crossing_ns: int, shape: float
) -> Fault:
    """A fault on any tag with a ``normal`` value and a ``high`` limit (for tests and what-ifs)."""
    tag = site.tag(asset, tag_name)
    if tag is None:
        raise FaultConfigError(f"fault on {asset}/{tag_name}: no such tag in site {site.site}")
    if tag.alarm is None or tag.alarm.high is None or tag.normal is None:
        raise FaultConfigError(f"fault on {asset}/{tag_name}: the tag needs 'normal' and 'alarm.high'")
    if crossing_ns <= start_ns:
        raise FaultConfigError(f"fault on {asset}/{tag_name}: crossing must come after the start")
    return Fault(asset, tag_name, kind, start_ns, crossing_ns, tag.normal, tag.alarm.high, shape)
