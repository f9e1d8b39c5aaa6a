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
}


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
        return np.asarray(u**g, dtype=np.float64)

    def offset(self, times_ns: NDArray[np.int64]) -> NDArray[np.float64]:
        return (self.limit - self.normal) * self.progress(times_ns)


def make_faults(site: Site, seed: int, epoch_ns: int) -> list[Fault]:
    """The ground truth for ``seed`` and ``epoch_ns``; specs whose asset/tag the site lacks are skipped."""
    rng = np.random.default_rng([seed, 0xFA17])
    faults = []
    for asset, tag_name, kind in FAULT_SPECS:
        # Draw for every spec, present or not, so one site's faults do not shift another's timing.
        start_days, cross_days = rng.uniform(*START_DAYS_BEFORE), rng.uniform(*CROSSING_DAYS_AFTER)
        shape = rng.uniform(*_SHAPE_RANGE[kind])
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
