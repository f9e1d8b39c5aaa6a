"""Causal row-by-row scoring of one series: what the live system would have said at each row.

Every estimate at row ``i`` is a recursive (exponentially weighted) filter over rows ``0..i``, run
with `scipy.signal.lfilter`, so it is vectorised and provably causal: changing a later row cannot
change an earlier score.

- Level and trend: Brown's double exponential smoothing with ``alpha = 2 / (span + 1)`` (equal to
  an exponentially weighted linear regression on the row number).
- Noise: exponentially weighted RMS of the one-step prediction errors, each scored against the
  noise known *before* that row. ``anomaly`` = two-sided normal probability of that z.
- Trend significance: ``t = trend / (sigma x C)``, where ``C`` is the exact standard error factor
  of the exponentially weighted regression slope for unit white noise.
- Hours to alarm: (limit - level) / trend rows, times the exponentially weighted row spacing.

Flags (the same vocabulary as the job): CRITICAL when the level is beyond the limit, or a
significant trend reaches it within ``critical_hours``; DEGRADING when a significant trend
reaches it within the horizon; WATCH within ``watch_horizons`` horizons, or on an anomalous row
(``anomaly >= anomaly_watch``); OK otherwise. Rows before ``warmup`` rows have no trend verdict.

``score`` in [0, 1]: 1 beyond the limit; ``exp(-hours_to_alarm / horizon)`` for a significant trend
toward the limit; at least ``0.5 x clip((anomaly - 0.99) / 0.01, 0, 1)``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.signal import lfilter
from scipy.special import erf, log_ndtr
from scipy.stats import binom

from flowline.analytics.rules import DEFAULT_WATCH_SURPRISE, Flag

FLAG_NAMES = np.array([f.name for f in Flag])


@dataclass(frozen=True)
class DetectorSettings:
    span: float = 144.0  # rows; 144 = one day of 10-minute data
    horizon_hours: float = 168.0
    critical_hours: float = 48.0
    watch_horizons: float = 3.0
    trend_t: float = 4.0
    anomaly_watch: float = 0.9999
    warmup: int | None = None  # rows; default = span
    season_hours: float = 24.0  # 0 disables the causal daily-profile removal
    season_days: float = 3.0  # memory of the per-hour-of-day profile, in cycles
    alarm_high: float | None = None
    alarm_low: float | None = None
    # Surprise (tags with or without limits): a fast level, a long-memory robust noise scale, one
    # alert per episode; see `surprise`.
    surprise_span: float = 50.0  # rows of the level the next value is compared with
    surprise_memory: float = 20000.0  # rows of the robust noise scale (slow: a fault must not become noise)
    shift_span: float = 8.0  # rows of the recent mean also compared with that level (0: one-step only)
    realert_hours: float = 24.0  # a surprise alerts only when it beats every surprise of this many hours
    realert_margin: float = 3.0  # ... by this much (3 = a thousand times less likely): one alert per episode
    episode_gap_hours: float = 1.0  # an episode (rows at WATCH level) ends after this long without one
    realert_factor: float = 3.0  # within an episode its peak counts x this, an earlier episode's / this (1: off)
    novelty_days: float = 4.0  # a deviation or pattern shown in these days stays below WATCH (0: off)
    # A change of behaviour rather than of level (an oscillation starting, bursts of spikes): large
    # steps counted over the last `burst_rows` rows against the tag's long-run rate of them.
    burst_rows: int = 48  # rows counted: about 4 h of 5-minute data, a spell long enough to be a new regime (0: off)
    burst_z: float = 3.0  # a step |x[i] - x[i-1]| counts beyond this many long-run noise units of steps
    # ... and the noise amplitude rising or falling: the recent mean absolute step against its long-run
    # mean. 288 rows: a day of 5-minute data, so a quiet night or a busy hour is averaged, not a change.
    amplitude_span: float = 288.0  # rows of the recent mean absolute step (0: off)
    # An alert raised by the row or the recent mean needs the recent (shift_span) mean on the row's side
    # of the level, by twice this many of its noise units at that row or by this many at the next one
    # (then reported there, one row late): a spike straight out of a dip, which the next row cancels,
    # is not news. 0.1 to 0.5 score alike on NAB (what counts is the side); 0: off.
    confirm_z: float = 0.5
    watch_surprise: float = DEFAULT_WATCH_SURPRISE  # WATCH at -log10(p) >= this (the job's level too)


def _ewma(x: np.ndarray, alpha: float, first: float) -> np.ndarray:
    out, _ = lfilter([alpha], [1.0, alpha - 1.0], x, zi=np.array([(1.0 - alpha) * first]))
    return np.asarray(out, dtype=float)


def _running_mean(x: np.ndarray, alpha: float) -> np.ndarray:
    """Bias-corrected exponentially weighted mean: the plain mean of the rows so far while there are
    fewer than about ``1 / alpha`` of them, an EWMA after that. Seeding a slow EWMA with its first
    value instead leaves that one value half the weight for ``0.7 / alpha`` rows (two weeks of
    10-minute data at ``surprise_memory``), and every later row is judged against it."""
    weights = _ewma(np.ones(len(x)), alpha, 0.0)
    return np.asarray(_ewma(x, alpha, 0.0) / weights, dtype=float)


def _slope_se_factor(alpha: float) -> float:
    """Standard error of the exponentially weighted LS slope for unit white noise (steady state)."""
    lam = 1.0 - alpha
    k = np.arange(int(50 / alpha) + 10, dtype=float)
    w = lam**k
    t = -k
    tbar = float((w * t).sum() / w.sum())
    d = t - tbar
    return math.sqrt(float((w**2 * d**2).sum())) / float((w * d**2).sum())


def _causal_profile(x: np.ndarray, t_ns: np.ndarray, settings: DetectorSettings, alpha: float) -> np.ndarray:
    """Per hour-of-cycle mean deviation from a slow level, from *earlier cycles only*; a daily cycle
    would otherwise read as alternating trends. Zero until a phase has been seen once."""
    slow = _ewma(x, alpha / 4, x[0])
    dev = x - slow
    period_h = settings.season_hours
    phase = np.floor((t_ns / 3.6e12) % period_h).astype(np.int64)
    gamma = 2.0 / (settings.season_days * 6 + 1.0)  # about 6 rows per phase per cycle at 10 minutes
    profile = np.zeros(len(x))
    # Running sum of every phase's latest value, so the profile can be centred (a drift raises all
    # phases alike and must stay in the level, not in the profile).
    table_delta = np.zeros(len(x))
    order = np.argsort(phase, kind="stable")
    bounds = np.searchsorted(phase[order], np.arange(math.ceil(period_h) + 1))
    for start, stop in itertools.pairwise(bounds):
        rows = order[start:stop]
        if len(rows) < 2:
            continue
        smoothed = _ewma(dev[rows], gamma, 0.0)
        profile[rows[1:]] = smoothed[:-1]
        table_delta[rows] = np.diff(smoothed, prepend=0.0)
    table_sum = np.cumsum(table_delta)
    mean_before = np.zeros(len(x))
    mean_before[1:] = table_sum[:-1] / math.ceil(period_h)
    return profile - mean_before


def _prior(x: np.ndarray) -> np.ndarray:
    """The value known before each row (row 0 gets its own)."""
    out = np.empty_like(x)
    out[0] = x[0]
    out[1:] = x[:-1]
    return out


def surprise(t_ns: np.ndarray, x: np.ndarray, settings: DetectorSettings) -> tuple[np.ndarray, np.ndarray]:
    """(surprise, alert) per row, causal.

    Two statistics compare the recent past with the level of the rows before it (an exponentially
    weighted mean over ``surprise_span`` rows): the row itself (a spike) and the exponentially
    weighted mean of the last ``shift_span`` rows (a shift too small for any single row to stand out,
    e.g. a step of two noise units, which eight rows make clear). Each is divided by its own robust
    scale (mean absolute value x sqrt(pi/2), exponentially weighted over ``surprise_memory`` rows,
    known before the row), so the autocorrelation of the averaged statistic is measured, not assumed.
    Two more looks see a change of behaviour rather than of level, on the steps |x[i] - x[i-1]|: the
    count of large steps among the last ``burst_rows`` rows against the tag's long-run rate of them
    (binomial tail, `_burst_surprise`: an oscillation starting, spikes coming denser), and the noise
    amplitude rising or falling (`_amplitude_surprise`), with no row or mean beyond the usual.
    ``surprise`` = -log10 of the smallest probability (two-sided normal for the deviations and the
    amplitude), Bonferroni-corrected for the number of looks, so 10^-surprise stays a conservative
    false-alert probability per row under Gaussian noise.

    Novelty (the ideas of CAD OSE: a range learned so far, and contexts of recent quantised values):
    a row has done this before, however improbable the Gaussian model finds it (heavy tails,
    recurring bursts), when its deviations (each look, signed) stay within the range the tag showed
    over the previous ``novelty_days`` (its first ``surprise_span`` rows excepted), or when the
    pattern of its last ``shift_span`` rows (each row's signed deviation in octaves of the noise
    scale) already occurred in that time. Its surprise is capped one decade below
    ``watch_surprise``: only a new deviation in a new pattern raises WATCH.
    The behaviour looks have their own ranges: the count is familiar when some spell of the previous
    ``novelty_days`` held as many large steps (a tag that oscillates every afternoon alerts on the
    first day), the amplitude when its z stays within that time's range in both directions.

    ``alert`` is the surprise where it beats the reference by ``realert_margin`` and 0 elsewhere:
    about one alert per episode (a level shift surprises for many rows; an operator wants to hear
    about it once). The reference is the larger of ``realert_factor`` times the peak surprise of the
    current episode (rows at WATCH level less than ``episode_gap_hours`` apart) and the peak of the
    previous ``realert_hours`` divided by it: within an episode only a far stronger phase alerts
    again (3 x the decades: the probability cubed), while an earlier episode of the day still raises
    the bar for a separate event (bursts come with aftershocks) without it having to outdo that one.

    An alert raised by the row or the recent mean must then be backed (``confirm_z``): the recent
    mean on the row's side of the level at that row, or at the next row, where the alert is then shown,
    one row late. A row the recent mean does not follow is not reported; it still counts as a
    surprise for the references above. Alerts of the behaviour looks need no backing (a change of
    amplitude has no side).
    """
    level = _prior(_ewma(x, 2.0 / (settings.surprise_span + 1.0), x[0]))
    floor = 1e-9 * (np.abs(level) + 1.0)
    mad_alpha = 2.0 / (settings.surprise_memory + 1.0)
    recents = [x]
    if settings.shift_span > 1:
        recents.append(_ewma(x, 2.0 / (settings.shift_span + 1.0), x[0]))
    looks = len(recents) + (1 if settings.burst_rows > 0 else 0) + (1 if settings.amplitude_span > 0 else 0)
    z = np.zeros(len(x))
    recent_z = np.zeros(len(x))  # the recent mean's signed deviation, in its own noise units
    direction = np.zeros(len(x))  # the sign of the row's own deviation
    octave = np.zeros(len(x), dtype=np.int64)
    novel = np.zeros(len(x), dtype=bool)
    seen_from = np.searchsorted(t_ns, t_ns - settings.novelty_days * 86400e9, side="left")
    # The first surprise_span rows deviate from a level still forming (the first value, then the mean
    # of a few rows): as they get no verdict (below), later rows do not count them as already shown.
    warmup = max(1, int(settings.surprise_span))
    seen_from = np.where(np.arange(len(x)) >= warmup, np.maximum(seen_from, warmup), seen_from)
    for recent in recents:
        signed = recent - level
        dev = np.abs(signed)
        mad = _prior(_running_mean(dev, mad_alpha))
        z_look = dev / np.maximum(mad * math.sqrt(math.pi / 2), floor)
        if recent is x:
            # |z| < 2 is 0, 2-4 is +-1, 4-8 is +-2, ...: coarse enough for a pattern to recur.
            octave = (np.sign(signed) * np.floor(np.log2(np.maximum(z_look, 1.0)))).astype(np.int64)
            direction = np.sign(signed)
        else:
            recent_z = z_look * np.sign(signed)
        z = np.maximum(z, z_look)
        novel |= (signed > _window_max(signed, seen_from)) | (-signed > _window_max(-signed, seen_from))
    # Each look's two-sided probability, times the number of looks (Bonferroni).
    value = np.maximum(-(math.log(2.0 * looks) + log_ndtr(-z)) / math.log(10.0), 0.0)
    # No verdict before the level and the noise scale have seen ``surprise_span`` rows: a scale
    # estimated from a handful of deviations makes ordinary rows look like 1-in-10^10 events.
    value[:warmup] = 0.0
    # A decade below WATCH: the surprise column still shows it, the WATCH level is not reached.
    capped = settings.watch_surprise - 1.0
    if settings.novelty_days > 0:
        novel &= ~_pattern_seen(octave, max(int(settings.shift_span), 1), seen_from)
        value = np.where(novel, value, np.minimum(value, capped))
    deviation_value = value
    step = np.abs(np.diff(x, prepend=x[0]))
    mean_step = _prior(_running_mean(step, mad_alpha))
    behaviour = []  # (natural log of the probability, signed statistic whose 4-day range makes it familiar)
    if settings.burst_rows > 0:
        behaviour.append(_burst_surprise(step, mean_step, settings, mad_alpha, floor))
    if settings.amplitude_span > 0:
        behaviour.append(_amplitude_surprise(step, mean_step, settings, mad_alpha, floor, warmup))
    for log_p, statistic in behaviour:
        look = np.maximum(-(math.log(looks) + log_p) / math.log(10.0), 0.0)
        look[:warmup] = 0.0
        familiar = (statistic <= _window_max(statistic, seen_from)) & (
            -statistic <= _window_max(-statistic, seen_from)
        )
        value = np.maximum(value, np.where(familiar, np.minimum(look, capped), look))
    # Running maxima over the previous realert window, by time: a monotone deque would be O(n) too,
    # but a window count per row keeps it vectorised with a sparse table of maxima.
    start = np.searchsorted(t_ns, t_ns - settings.realert_hours * 3.6e12, side="left")
    episode = _episode_start(t_ns, value >= settings.watch_surprise, settings.episode_gap_hours * 3.6e12)
    previous = np.maximum(
        settings.realert_factor * _window_max(value, np.maximum(start, episode)),
        _window_max(value, start) / settings.realert_factor,
    )
    alert = np.where(value > previous + settings.realert_margin, value, 0.0)
    if settings.confirm_z > 0 and len(recents) > 1:
        # In the direction of the candidate row's own deviation, at that row and at the next one.
        # Unbacked rows still count as surprises for the episode and the day (references above).
        needs = deviation_value >= value  # raised by the row or the recent mean, not a behaviour look
        now = ~needs | (recent_z * direction >= 2.0 * settings.confirm_z)
        late = np.zeros(len(x))
        late[1:] = np.where(~now[:-1] & (recent_z[1:] * direction[:-1] >= settings.confirm_z), alert[:-1], 0.0)
        alert = np.maximum(np.where(now, alert, 0.0), late)
    return value, alert


def _burst_surprise(
    step: np.ndarray, mean_step: np.ndarray, settings: DetectorSettings, alpha: float, floor: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(natural log of the probability, count) of the large steps among the last ``burst_rows`` rows.

    A step |x[i] - x[i-1]| is large beyond ``burst_z`` times its long-run scale (``mean_step``, the
    mean absolute step over ``surprise_memory`` rows known before the row, x sqrt(pi/2)). Steps, not
    deviations from the level: a level shift is one large step, not a spell of them, so this look
    sees how the tag moves, not where it is. The count is tested against the tag's own long-run rate
    of large steps (`_running_mean` over ``surprise_memory`` rows, known before the row) with a
    binomial tail: a spike is two large steps, an oscillation starting or spikes coming denser are
    many. The rate stays within one in ``surprise_memory`` rows of 0 and 1, so on a tag that never
    stepped far a large step is improbable, not impossible."""
    n = len(step)
    large = (step > settings.burst_z * np.maximum(mean_step * math.sqrt(math.pi / 2), floor)).astype(float)
    large[0] = 0.0
    counted = np.cumsum(large)
    rows = np.arange(n)
    first = rows - settings.burst_rows  # the row before the counted spell
    count = counted - np.where(first >= 0, counted[np.maximum(first, 0)], 0.0)
    spell = np.minimum(rows + 1, settings.burst_rows)
    least = 1.0 / settings.surprise_memory
    rate = np.clip(_prior(_running_mean(large, alpha)), least, 1.0 - least)
    return np.asarray(binom.logsf(count - 1, spell, rate)), count


def _amplitude_surprise(
    step: np.ndarray, mean_step: np.ndarray, settings: DetectorSettings, alpha: float, floor: np.ndarray,
    warmup: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(natural log of the two-sided probability, z) of the noise amplitude rising or falling.

    The amplitude is the mean absolute step over the last ``amplitude_span`` rows (exponentially
    weighted, bias-corrected), compared with ``mean_step`` as the log of their ratio; that ratio is
    scored like the other looks, in units of its own robust spread around its own long-run mean
    (both over ``surprise_memory`` rows, known before the row). Real amplitudes wander (quiet nights,
    busy hours), so the spread is measured rather than taken from the Gaussian: only a change larger
    than the tag's own wander is improbable. Steps again, so a level shift barely moves it. The
    ratio's own mean and spread start after the ``warmup`` rows (before, a mean of a few steps makes
    ratios of e^20, which a running mean would carry for thousands of rows), and its verdict four
    ``amplitude_span`` later."""
    z = np.zeros(len(step))
    # The ratio moves over about a span of rows, so its spread needs several spans of them: with
    # one, nearly every tag alerted a row after its warm-up.
    start = warmup + int(4 * settings.amplitude_span)
    if len(step) > start:
        recent = _running_mean(step, 2.0 / (settings.amplitude_span + 1.0))
        ratio = np.log(np.maximum(recent, floor) / np.maximum(mean_step, floor))[warmup:]
        centre = _prior(_running_mean(ratio, alpha))
        spread = _prior(_running_mean(np.abs(ratio - centre), alpha)) * math.sqrt(math.pi / 2)
        z[start:] = ((ratio - centre) / np.maximum(spread, 1e-12))[start - warmup :]
    return np.asarray(math.log(2.0) + log_ndtr(-np.abs(z))), z


def _episode_start(t_ns: np.ndarray, loud: np.ndarray, gap_ns: float) -> np.ndarray:
    """Per row: the first row of the episode it continues, or the row itself when it starts one.

    An episode is a run of ``loud`` rows less than ``gap_ns`` apart; a row continues it while the last
    loud row before it is at most ``gap_ns`` earlier."""
    n = len(t_ns)
    rows = np.arange(n)
    loud_rows = np.nonzero(loud)[0]
    if len(loud_rows) == 0:
        return rows
    # Each loud row's episode start: itself after a gap, else the start of the one before it.
    opens = np.diff(t_ns[loud_rows], prepend=-np.inf) > gap_ns
    opened_at = np.maximum.accumulate(np.where(opens, loud_rows, 0))
    last = np.searchsorted(loud_rows, rows, side="left") - 1  # the last loud row strictly before each row
    has = last >= 0
    last = np.maximum(last, 0)
    continues = has & (t_ns - t_ns[loud_rows[last]] <= gap_ns)
    return np.where(continues, opened_at[last], rows)


def _pattern_seen(octave: np.ndarray, length: int, seen_from: np.ndarray) -> np.ndarray:
    """Per row: did the same sequence of ``length`` octaves (this row's and the ones before it) end at
    an earlier row ``>= seen_from``? Exact (no hashing): each run of up to 10 octaves is packed into
    one integer, 6 bits an octave (clipped to +-31: 2^31 noise units and beyond look alike), so one
    sort of integers numbers the sequences; sorting the rows of an (n, 8) array took 25x longer."""
    n = len(octave)
    digits = np.clip(np.concatenate([np.zeros(length - 1, dtype=np.int64), octave]), -31, 31) + 32
    columns = []
    for first in range(0, length, 10):
        key = np.zeros(n, dtype=np.int64)
        for k in range(first, min(first + 10, length)):
            key = (key << 6) | digits[k : k + n]
        columns.append(key)
    if len(columns) == 1:
        ids = columns[0]
    else:
        _, ids = np.unique(np.stack(columns, axis=1), axis=0, return_inverse=True)
        ids = ids.ravel()
    order = np.argsort(ids, kind="stable")  # rows of one sequence, in time order
    previous = np.full(n, -1)
    same = ids[order[1:]] == ids[order[:-1]]
    previous[order[1:][same]] = order[:-1][same]
    return np.asarray(previous >= seen_from)


def _window_max(v: np.ndarray, start: np.ndarray) -> np.ndarray:
    """max(v[start[i]:i]) per row (-inf when empty), by a sparse table: O(n log n), no Python loop per row."""
    n = len(v)
    out = np.full(n, -np.inf)
    length = np.arange(n) - start
    has = length > 0
    if not has.any():
        return out
    table = [v]
    k = 1
    while 2 * k <= int(length.max()):
        prev = table[-1]
        table.append(np.maximum(prev[:-k], prev[k:]))
        k *= 2
    idx = np.nonzero(has)[0]
    lvl = np.floor(np.log2(length[idx])).astype(int)
    span = 1 << lvl
    for j in np.unique(lvl):
        rows = idx[lvl == j]
        t = table[j]
        left = t[start[rows]]
        right = t[rows - span[lvl == j]]
        out[rows] = np.maximum(left, right)
    return out


def false_alerts_per_week(surprise_level: float | np.ndarray, rows_per_hour: float | np.ndarray) -> np.ndarray:
    """The nominal false-alert rate of a tag thresholded at ``surprise_level``: p x rows per week under
    Gaussian noise, at most one per episode in practice (an alert needs a new high of its episode).
    Real noise has heavier tails than Gaussian: bench/nab.py and the tests measure the real rate."""
    return np.asarray(10.0 ** -np.asarray(surprise_level, dtype=float) * np.asarray(rows_per_hour) * 168.0)


def score_series(times: pd.DatetimeIndex | np.ndarray, values: np.ndarray, settings: DetectorSettings) -> pd.DataFrame:
    """Score each row causally; returns level, trend_per_hour, sigma, anomaly, hours_to_alarm, score, flag."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        raise ValueError("no rows to score")
    finite = np.isfinite(x)
    if not finite.all():
        # Carry the last finite value forward (causal); a leading gap takes the first finite value.
        idx = np.where(finite, np.arange(n), 0)
        np.maximum.accumulate(idx, out=idx)
        first_finite = int(np.argmax(finite)) if finite.any() else 0
        idx[: first_finite] = first_finite
        x = x[idx] if finite.any() else np.zeros(n)
    t_ns = np.asarray(pd.DatetimeIndex(times).as_unit("ns").asi8, dtype=float)
    alpha = 2.0 / (settings.span + 1.0)
    if settings.season_hours > 0:
        x = x - _causal_profile(x, t_ns, settings, alpha)
    s1 = _ewma(x, alpha, x[0])
    s2 = _ewma(s1, alpha, x[0])
    level = 2 * s1 - s2
    trend = alpha / (1 - alpha) * (s1 - s2)  # per row
    pred = np.empty(n)
    pred[0] = x[0]
    pred[1:] = level[:-1] + trend[:-1]
    err = x - pred
    beta = alpha / 4  # noise adapts slower than the level so a drift is not absorbed as noise
    var = _ewma(err**2, beta, float(err[1] ** 2) if n > 1 else 0.0)
    prior_var = np.empty(n)
    prior_var[0] = var[0]
    prior_var[1:] = var[:-1]
    sigma = np.sqrt(prior_var)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sigma > 0, err / sigma, 0.0)
    anomaly = erf(np.abs(z) / math.sqrt(2))
    # Row spacing in hours, a bias-corrected EWMA of the gaps seen so far (row 0 has none).
    gaps = np.zeros(n)
    gaps[1:] = np.diff(t_ns) / 3.6e12
    seen = np.ones(n)
    seen[0] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        dt_h = np.nan_to_num(_ewma(gaps, alpha, 0.0) / _ewma(seen, alpha, 0.0))
    se = np.sqrt(var) * _slope_se_factor(alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        tstat = np.where(se > 0, trend / se, 0.0)
    warm = np.arange(n) >= (settings.warmup if settings.warmup is not None else int(settings.span))
    significant = warm & (np.abs(tstat) >= settings.trend_t)

    hours = np.full(n, np.inf)
    beyond = np.zeros(n, dtype=bool)
    for limit, sign in ((settings.alarm_high, 1.0), (settings.alarm_low, -1.0)):
        if limit is None:
            continue
        beyond |= warm & (sign * (level - limit) >= 0)
        toward = significant & (sign * trend > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = np.where(toward, (limit - level) / trend * dt_h, np.inf)
        hours = np.minimum(hours, np.where(h >= 0, h, np.inf))
    hours[beyond] = 0.0

    horizon = settings.horizon_hours
    to_per_hour = np.where(dt_h > 0, 1.0 / np.where(dt_h > 0, dt_h, 1.0), 0.0)
    surprised, alert = surprise(t_ns, x, settings)
    # Half the scale for surprises: a trend to a limit within the horizon always ranks above them.
    score = np.maximum(
        np.where(np.isfinite(hours), np.exp(-hours / horizon), 0.0),
        0.5 * np.clip(alert / (2 * settings.watch_surprise), 0, 1),
    )
    flag = np.full(n, int(Flag.OK))
    flag[(hours <= settings.watch_horizons * horizon) | (alert >= settings.watch_surprise)] = int(Flag.WATCH)
    flag[hours <= horizon] = int(Flag.DEGRADING)
    flag[hours <= settings.critical_hours] = int(Flag.CRITICAL)
    return pd.DataFrame(
        {
            "level": level,
            "trend_per_hour": trend * to_per_hour,
            "sigma": sigma,
            "anomaly": anomaly,
            "surprise": surprised,
            "alert": alert,
            "false_alerts_per_week": false_alerts_per_week(surprised, to_per_hour),
            "hours_to_alarm": np.where(np.isfinite(hours), hours, np.nan),
            "score": np.clip(score, 0, 1),
            "flag_level": flag,
            "flag": FLAG_NAMES[flag],
        },
        index=pd.DatetimeIndex(times),
    )


@dataclass(frozen=True)
class ExportReport:
    """What reading a CSV export found and changed; `flowline detect` prints it."""

    rows_read: int
    rows_scored: int
    out_of_order: int = 0  # rows that came earlier in time than a row before them in the file
    duplicates_dropped: int = 0  # rows removed because a later row had the same timestamp
    non_numeric: int = 0  # values present but not numbers (e.g. "Bad", "#N/A"): scored as missing
    empty: int = 0  # empty values: scored as missing
    first_non_numeric: str = ""  # e.g. "line 7: 'Bad'"

    def lines(self) -> list[str]:
        out = []
        if self.out_of_order or self.duplicates_dropped:
            out.append(
                f"--fix-time-order: sorted {self.out_of_order} out-of-order row(s), "
                f"dropped {self.duplicates_dropped} row(s) with a repeated timestamp (the last one in the file kept)"
            )
        if self.non_numeric:
            out.append(
                f"{self.non_numeric} non-numeric value(s) scored as missing (first at {self.first_non_numeric})"
            )
        if self.empty:
            out.append(f"{self.empty} empty value(s) scored as missing")
        return out


def read_export(
    path: str, time_col: str, value_col: str, *, fix_time_order: bool = False
) -> tuple[pd.DatetimeIndex, np.ndarray, ExportReport]:
    """Times (UTC) and float values of a CSV export; raises `ValueError` naming the problem.

    Rows must be in strictly increasing time order: a causal score depends on the order of the rows,
    and a repeated timestamp is usually a daylight-saving repeat in local time or two merged files,
    where silently keeping one row loses data. ``fix_time_order`` sorts the rows (stable) and keeps
    the last row of each repeated timestamp; the report counts both.
    """
    frame = pd.read_csv(path, dtype={value_col: str}, keep_default_na=False)
    for col in (time_col, value_col):
        if col not in frame.columns:
            raise ValueError(f"{path}: no column {col!r} (columns: {', '.join(map(str, frame.columns))})")
    rows_read = len(frame)
    times = pd.to_datetime(frame[time_col], utc=True, errors="coerce", format="mixed")
    bad = times.isna()
    if bad.any():
        row = int(np.argmax(bad.to_numpy())) + 2  # +1 header, +1 one-based
        raise ValueError(f"{path}: line {row}: cannot parse time {frame[time_col].iloc[row - 2]!r}")
    text = frame[value_col].astype(str).str.strip()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)
    empty = (text == "") | text.str.lower().isin(("nan", "na", "null", "none"))
    non_numeric = np.isnan(values) & ~empty.to_numpy()
    first_bad = ""
    if non_numeric.any():
        i = int(np.argmax(non_numeric))
        first_bad = f"line {i + 2}: {text.iloc[i]!r}"
    t_ns = times.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    steps = np.diff(t_ns)
    out_of_order = duplicates = 0
    if (steps <= 0).any():
        i = int(np.argmax(steps <= 0)) + 1
        what = "repeats" if steps[i - 1] == 0 else "goes back to"
        if not fix_time_order:
            raise ValueError(
                f"{path}: line {i + 2}: time {what} {frame[time_col].iloc[i]!r} (line {i + 1}: "
                f"{frame[time_col].iloc[i - 1]!r}). Rows must be in increasing time order: a causal score "
                "depends on it, and a repeated time (a daylight-saving repeat in local time, merged files) "
                "may be real data that de-duplicating would drop. Export in UTC if you can; "
                "--fix-time-order sorts and keeps the last row per timestamp, and reports what it changed"
            )
        running_max = np.maximum.accumulate(t_ns)
        out_of_order = int(np.sum(t_ns[1:] < running_max[:-1]))
        order = np.argsort(t_ns, kind="stable")
        t_sorted = t_ns[order]
        keep = np.ones(len(order), dtype=bool)
        keep[:-1] = t_sorted[1:] != t_sorted[:-1]  # the last of each run of equal times
        duplicates = int((~keep).sum())
        order = order[keep]
        t_ns, values = t_ns[order], values[order]
    report = ExportReport(
        rows_read, len(values), out_of_order, duplicates, int(non_numeric.sum()), int(empty.sum()), first_bad
    )
    return pd.DatetimeIndex(pd.to_datetime(t_ns, utc=True)), values, report


def score_csv(
    path: str, time_col: str, value_col: str, settings: DetectorSettings, *, fix_time_order: bool = False
) -> tuple[pd.DataFrame, ExportReport]:
    """Read a CSV export (`read_export`) and score it; raises `ValueError` naming the missing column or bad rows."""
    times, values, report = read_export(path, time_col, value_col, fix_time_order=fix_time_order)
    scored = score_series(times, values, settings)
    scored.insert(0, value_col, values)
    scored.index.name = time_col
    return scored, report
