"""Fault shapes of the simulator and their ground truth (lab/flowline/lab/sim/faults.py)."""

from __future__ import annotations

import numpy as np
import pytest

from flowline.inventory import load_site
from flowline.lab.sim.faults import NS_PER_DAY, FaultKind, bursts, fault_for, make_faults
from tests.conftest import EXAMPLE_SITE

SITE = load_site(EXAMPLE_SITE)
EPOCH = 1_768_435_200 * 10**9  # 2026-01-15T00:00Z


@pytest.mark.parametrize("kind", list(FaultKind))
def test_every_shape_is_zero_before_the_start_and_at_the_limit_at_the_crossing(kind: FaultKind) -> None:
    f = fault_for(SITE, "P-102", "vibration_rms", kind, EPOCH - 6 * NS_PER_DAY, EPOCH + 3 * NS_PER_DAY, 1.5
                  if kind is not FaultKind.STEP_THEN_DRIFT else 0.3)
    before = f.offset(np.array([EPOCH - 7 * NS_PER_DAY]))
    assert before[0] == 0.0
    if kind is FaultKind.INTERMITTENT:
        # The bursts reach the full offset; between them half of it.
        t = EPOCH + 3 * NS_PER_DAY + np.arange(0, 24 * 3600, 600) * 10**9
        ratio = f.offset(t) / (f.limit - f.normal) / ((t - f.start_ns) / (f.crossing_ns - f.start_ns))
        assert set(np.round(ratio, 6)) == {0.5, 1.0}
        assert 0.2 < bursts(t).mean() < 0.45
    else:
        assert f.normal + f.offset(np.array([f.crossing_ns]))[0] == pytest.approx(f.limit)


def test_step_then_drift_steps_at_the_start_then_rises_linearly() -> None:
    f = fault_for(SITE, "E-201", "approach_temp", FaultKind.STEP_THEN_DRIFT, EPOCH, EPOCH + 10 * NS_PER_DAY, 0.3)
    p = f.progress(np.array([EPOCH + 1, EPOCH + 5 * NS_PER_DAY, EPOCH + 10 * NS_PER_DAY]))
    assert p == pytest.approx([0.3, 0.65, 1.0], abs=1e-6)


def test_kinds_override_keeps_the_timing_and_the_demo_default() -> None:
    default = make_faults(SITE, 4, EPOCH)
    other = make_faults(SITE, 4, EPOCH, kinds={"P-102": FaultKind.LINEAR_DRIFT})
    assert [f.kind for f in default] == [FaultKind.BEARING_WEAR, FaultKind.FOULING, FaultKind.FILTER_CLOGGING]
    assert other[0].kind is FaultKind.LINEAR_DRIFT and other[1:] == default[1:]
    assert (other[0].start_ns, other[0].crossing_ns) == (default[0].start_ns, default[0].crossing_ns)
