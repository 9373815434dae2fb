"""Sliding-window forecasting data shared by the traffic and utility departments.

Per site: the series lies on a regular grid; short target gaps (<= ``MAX_GAP`` steps) are
interpolated linearly. The split is at a public *test start*, a time the department configures
(``--test-start``; the bundled sites carry their own constants): a window whose targets all lie
before it trains, a window whose first target time is at or after it is tested. A share of the
site's own time range would move with its first and last reading, so one reading added after the
last (or the last one removed) would move hundreds of windows between training and test.

Every sample is a function of its own window's readings (and public constants): the target
is normalised per window (instance normalisation, RevIN style, as in PatchTST) by the mean
and floored std of that window's own lookback, the model predicts the horizon in those
window units, and :meth:`citydata.base.Split.to_original` turns predictions back into the
target's unit with the same window's statistics. Temperature is scaled with public reference
constants (:data:`TEMPERATURE_REFERENCE`). No statistic of the site's other records enters a
sample, so one reading changes only the samples of the windows that contain it, which is
what DP-SGD and the node's ledger account for (one window = one training record).

Windows whose inputs or targets contain a missing value are dropped (with a warning), as are
windows holding an interpolated value whose gap is not bounded by readings inside the same
window, and test windows whose seasonal-naive reference is missing (a training window whose
reference, outside the window, is missing carries the persistence forecast in its place: the
naive forecasts only score test windows); training windows are kept every ``train_stride`` steps of
the grid, on a public phase: a window is kept when its first target time lies a multiple of
``train_stride`` steps after 1970-01-01 00:00 (not a count of the surviving windows, nor of steps
from the site's first reading).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from typing import ClassVar

import numpy as np
import pandas as pd

from .base import DataFileError, DepartmentDataset, SiteData, Split, shown_name, warn_quality
from .timestamps import YEAR_RANGE

#: Environment variable with the test start of a node's own forecasting file (``fl-client
#: --test-start`` sets it for the node's ClientApp processes, as ``--date-format`` sets its own).
TEST_START_ENV = "CITYFED_TEST_START"

#: What a test start looks like: a date, or a date and a time of day (minutes, optionally seconds).
TEST_START_FORMAT = ("YYYY-MM-DD or 'YYYY-MM-DD HH:MM' (e.g. 2024-05-07 or '2024-05-07 12:00'; with the offset of a file "
                     "whose times carry one, e.g. '2024-05-07 12:00+02:00')")

_TEST_START_RE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?(?:Z|[+-]\d{2}:\d{2})?)?")

#: Longest run of missing target steps that is filled by linear interpolation.
MAX_GAP = 4

#: Public reference of the temperature channel, deg C: ``(T - 15) / 10``.
TEMPERATURE_REFERENCE = (15.0, 10.0)

#: Default share of a window's lookback mean magnitude below which its scale does not go
#: (a department may set its own public value: :attr:`citydata.base.Schema.relative_scale_floor`).
RELATIVE_SCALE_FLOOR = 0.01


def _short_gaps(nan: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Runs ``[a, b)`` of ``nan`` no longer than ``max_gap`` with data on both sides."""
    padded = np.concatenate([[False], nan, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2]) if b - a <= max_gap and a > 0 and b < len(nan)]


def interpolate_short_gaps(values: np.ndarray, max_gap: int = MAX_GAP) -> tuple[np.ndarray, int]:
    """Linearly fill runs of NaN no longer than ``max_gap`` that have data on both sides.

    Parameters
    ----------
    values : np.ndarray
        1-D float array.
    max_gap : int
        Longest run that is filled.

    Returns
    -------
    filled : np.ndarray
        Copy with the short interior gaps filled.
    n_filled : int
        Number of values filled.
    """
    v = np.asarray(values, dtype=np.float64).copy()
    nan = np.isnan(v)
    if not nan.any():
        return v, 0
    filled = 0
    for a, b in _short_gaps(nan, max_gap):
        left, right = v[a - 1], v[b]
        frac = np.arange(1, b - a + 1) / (b - a + 1)
        v[a:b] = left + (right - left) * frac
        filled += b - a
    return v, filled


def calendar_channels(times: pd.DatetimeIndex) -> np.ndarray:
    """Hour-of-day and day-of-week as sin/cos pairs, shape ``(n, 4)``.

    Hour of day includes minutes (``(hour + minute / 60) / 24``); day of week is Monday = 0.
    """
    tod = (times.hour.to_numpy() * 60 + times.minute.to_numpy()) / 1440.0
    dow = times.dayofweek.to_numpy() / 7.0
    return np.stack([np.sin(2 * np.pi * tod), np.cos(2 * np.pi * tod), np.sin(2 * np.pi * dow), np.cos(2 * np.pi * dow)], axis=1)


def window_scale(loc: np.ndarray, std: np.ndarray, floor: float, relative: float = RELATIVE_SCALE_FLOOR) -> np.ndarray:
    """A window's scale: its lookback std, floored.

    Parameters
    ----------
    loc, std : np.ndarray
        Each window's lookback mean and (population) std of the target.
    floor : float
        The department's public absolute floor, in target units (:attr:`Schema.scale_floor`).
    relative : float
        The department's public relative floor (:attr:`Schema.relative_scale_floor`).

    Returns
    -------
    np.ndarray
        ``max(std, relative * |loc|, floor)``: a flat lookback (a closed detector, a
        constant load) does not blow the window's targets up.
    """
    return np.maximum(np.maximum(std, float(relative) * np.abs(loc)), float(floor))


def window_normalise(lookback: np.ndarray, floor: float,
                     relative: float = RELATIVE_SCALE_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """Instance normalisation (RevIN style) of forecasting windows: each by its own lookback.

    Parameters
    ----------
    lookback : np.ndarray
        ``(n, lookback)`` raw target of each window's input steps (finite).
    floor : float
        Public absolute floor of the scale, in target units.
    relative : float
        Public relative floor of the scale (share of the lookback mean's magnitude).

    Returns
    -------
    loc, scale : np.ndarray
        float64 ``(n,)``: the lookback mean and :func:`window_scale`. A window's scaled
        value is ``(raw - loc) / scale``, and ``raw = scaled * scale + loc``; both depend on
        that window's own readings only (no statistic of the site's other records).
    """
    v = np.asarray(lookback, dtype=np.float64)
    loc = v.mean(axis=1)
    std = np.sqrt(((v - loc[:, None]) ** 2).mean(axis=1))
    return loc, window_scale(loc, std, floor, relative)


def temperature_channel(temperature: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Temperature scaled with the public reference constants, and its 0/1 availability flag.

    Parameters
    ----------
    temperature : np.ndarray
        Raw temperature in deg C (NaN where missing).

    Returns
    -------
    scaled, available : np.ndarray
        ``(T - TEMPERATURE_REFERENCE[0]) / TEMPERATURE_REFERENCE[1]`` where available (0
        elsewhere), and 1.0 / 0.0 availability. Each value is a function of its own reading.
    """
    temp = np.asarray(temperature, dtype=np.float64)
    avail = np.isfinite(temp)
    centre, spread = TEMPERATURE_REFERENCE
    scaled = np.where(avail, (np.where(avail, temp, centre) - centre) / spread, 0.0)
    return scaled, avail.astype(np.float64)


def parse_test_start(value) -> pd.Timestamp:
    """A test start from a configuration value.

    Parameters
    ----------
    value : str, datetime.datetime, datetime.date or pandas.Timestamp
        A date (``2024-05-07``: midnight) or a date and time of day (``2024-05-07 12:00`` or
        ``2024-05-07T12:00:00``), compared with the timestamps as the loader reads them: a file's
        times without a UTC offset as written, times with one converted to UTC
        (:mod:`citydata.timestamps`). A time with an offset (``2024-05-07 12:00+02:00``, or ``Z``)
        is converted to UTC the same way: give one for a file whose timestamps carry offsets.

    Returns
    -------
    pandas.Timestamp
        The time (nanosecond precision, no time zone; UTC when an offset was given).

    Raises
    ------
    ValueError
        Anything else: another layout, an impossible date, a year outside
        :data:`citydata.timestamps.YEAR_RANGE`. The message says what is accepted; the caller
        names its option or variable.
    """
    if isinstance(value, pd.Timestamp) or isinstance(value, (_dt.datetime, _dt.date)):
        if value is pd.NaT:
            raise ValueError(f"a test start is a time: {TEST_START_FORMAT}")
        ts = pd.Timestamp(value)
        if ts.tzinfo is not None:  # as the loader reads a timestamp with an offset: in UTC
            ts = ts.tz_convert("UTC").tz_localize(None)
    else:
        text = str(value).strip() if isinstance(value, str) else None
        if not text or len(text) > 40 or not _TEST_START_RE.fullmatch(text):
            shown = "" if text is None else (f" {text[:40]!r}" + (" (cut)" if len(text) > 40 else ""))
            raise ValueError(f"the test start{shown} is not a date: write {TEST_START_FORMAT}")
        try:
            ts = pd.Timestamp(_dt.datetime.fromisoformat(text.replace(" ", "T", 1).replace("Z", "+00:00")))
            if ts.tzinfo is not None:  # as the loader reads a timestamp with an offset: in UTC
                ts = ts.tz_convert("UTC").tz_localize(None)
        except ValueError:
            raise ValueError(f"the test start {text!r} is not a calendar date or time of day: write {TEST_START_FORMAT}") from None
    if not YEAR_RANGE[0] <= ts.year <= YEAR_RANGE[1]:
        raise ValueError(f"the test start's year {ts.year} is outside {YEAR_RANGE[0]}-{YEAR_RANGE[1]}")
    return ts.as_unit("ns") if hasattr(ts, "as_unit") else ts


def _window_sums(bad: np.ndarray, length: int) -> np.ndarray:
    """``out[s] = bad[s:s+length].sum()`` for every full window start ``s``."""
    c = np.concatenate([[0], np.cumsum(bad.astype(np.int64))])
    return c[length:] - c[:-length]


def build_forecast_site(
    site: str,
    times: pd.DatetimeIndex,
    target: np.ndarray,
    *,
    lookback: int,
    horizon: int,
    period: int,
    test_start: pd.Timestamp,
    train_stride: int = 1,
    scale_floor: float = 1e-6,
    relative_scale_floor: float = RELATIVE_SCALE_FLOOR,
    temperature: np.ndarray | None = None,
    with_temperature: bool = False,
    origin: str = "",
    time_column: str = "timestamp",
    meta: dict | None = None,
) -> SiteData:
    """Windows (each normalised by its own lookback) and naive baselines of one site.

    Parameters
    ----------
    site : str
        Site name (for messages).
    times : pd.DatetimeIndex
        Regular grid, one entry per step.
    target : np.ndarray
        Raw target on the grid (NaN where missing).
    lookback, horizon, period : int
        Input steps, predicted steps, steps per day (seasonal-naive lag).
    test_start : pandas.Timestamp
        Public split time: a window whose targets all lie before it is a training window, a window
        whose first target time is at or after it a test window (one straddling it is neither).
        It is configuration, not a function of the records, so one reading added or removed at
        either end of the site's range moves no other window between training and test.
    train_stride : int
        Keep the training windows whose first target time is a multiple of ``train_stride`` steps
        after 1970-01-01 00:00 (test windows: all).
    scale_floor, relative_scale_floor : float
        Public absolute (target units) and relative floors of a window's scale (:func:`window_scale`).
    temperature : np.ndarray, optional
        Raw temperature on the grid (NaN where missing); only used when ``with_temperature``.
    with_temperature : bool
        Add the temperature (public reference scaling) and the 0/1 temperature-available channels.
    origin : str
        File (or "bundled ...") for messages.
    time_column : str
        Name of the time column, for error messages.
    meta : dict, optional
        Extra entries for :attr:`SiteData.meta`.

    Returns
    -------
    SiteData
        ``X`` is ``(n, lookback, channels)``: window-normalised target, hour sin/cos, weekday
        sin/cos [, scaled temperature, temperature flag]; ``y`` is ``(n, horizon)`` target in
        the same window units; ``loc`` / ``scale`` of each split undo them
        (:meth:`Split.to_original`).
    """
    n = len(times)
    missing_raw = int(np.isnan(target).sum())
    y_raw, n_filled = interpolate_short_gaps(target)
    if n_filled:
        warn_quality(f"{origin}: site {shown_name(site)}: interpolated {n_filled} missing target value(s) "
                     f"in gaps of at most {MAX_GAP} steps (of {missing_raw} missing on the {n}-step grid)", stacklevel=5)
    cut_ns = pd.Timestamp(test_start).value
    t_ns = times.asi8
    if not np.isfinite(y_raw[t_ns < cut_ns]).any():
        raise DataFileError(origin, f"site {shown_name(site)} has no target value before the test start {pd.Timestamp(test_start)}",
                            "choose a later test start, or provide data for the time before it", time_column)

    channels = [np.zeros((n, 1)), calendar_channels(times)]  # channel 0: filled per window below
    t_meta = {}
    if with_temperature:
        temp = np.full(n, np.nan) if temperature is None else np.asarray(temperature, dtype=np.float64)
        t_scaled, avail = temperature_channel(temp)
        channels += [t_scaled[:, None], avail[:, None]]
        t_meta = {"temperature_reference": TEMPERATURE_REFERENCE, "temperature_available": float(avail.mean())}
    feats = np.concatenate(channels, axis=1).astype(np.float32)

    L, H, P = lookback, horizon, period
    W = L + H
    bad = ~np.isfinite(y_raw)
    first = max(0, P - L)
    starts = np.arange(first, n - W + 1)  # first target index j = s + L; seasonal ref j - P >= 0
    j = starts + L
    in_bad = _window_sums(bad, L)[starts]
    out_bad = _window_sums(bad, H)[j]
    seas_bad = _window_sums(bad, H)[j - P]
    # an interpolated value counts as a reading of its window only when both readings it is drawn
    # from lie in the same window; otherwise it carries a reading from outside
    cut_gap = np.zeros(len(starts), dtype=bool)
    for a, b in _short_gaps(np.isnan(np.asarray(target, dtype=np.float64)), MAX_GAP):
        touches = (starts <= b - 1) & (starts + W - 1 >= a)
        holds = (starts <= a - 1) & (starts + W - 1 >= b)
        cut_gap |= touches & ~holds
    is_train = t_ns[j + H - 1] < cut_ns  # every target before the test start
    is_test = t_ns[j] >= cut_ns
    # a training window's seasonal reference lies outside it when the period exceeds the lookback
    # (traffic): only the test windows, which are scored against it, need it
    ok = (in_bad == 0) & (out_bad == 0) & ~cut_gap & ((seas_bad == 0) | is_train)
    if train_stride > 1 and n > 1:
        # the stride's phase is public: steps since 1970-01-01 00:00 of the window's first target time,
        # not a count from the site's first reading (removing that reading would move every training window)
        step_ns = int(times.asi8[1] - times.asi8[0])
        is_train &= (times.asi8[j] // step_ns) % train_stride == 0

    parts = {}
    for name, sel in (("train", is_train), ("test", is_test)):
        dropped = int((sel & ~ok).sum())
        if dropped:
            warn_quality(f"{origin}: site {shown_name(site)}: dropped {dropped} of {int(sel.sum())} {name} windows that contain "
                         f"missing values (in inputs, targets or the seasonal-naive reference, or a short gap filled from a "
                         f"reading outside the window)", stacklevel=5)
        s = starts[sel & ok]
        jj = s + L
        inp = s[:, None] + np.arange(L)[None, :]
        hor = jj[:, None] + np.arange(H)[None, :]
        loc, scale = window_normalise(y_raw[inp], scale_floor, relative_scale_floor) if len(s) else (np.zeros(0), np.ones(0))
        sc = lambda v: ((v - loc[:, None]) / scale[:, None]).astype(np.float32)  # noqa: E731
        X = feats[inp] if len(s) else np.zeros((0, L, feats.shape[1]), np.float32)
        if len(s):
            X[:, :, 0] = sc(y_raw[inp])
        y = sc(y_raw[hor]) if len(s) else np.zeros((0, H), np.float32)
        persistence = sc(np.repeat(y_raw[jj - 1][:, None], H, axis=1)) if len(s) else np.zeros((0, H), np.float32)
        seasonal = sc(y_raw[hor - P]) if len(s) else np.zeros((0, H), np.float32)
        no_ref = ~np.isfinite(seasonal).all(axis=1)
        seasonal[no_ref] = persistence[no_ref]  # training windows only (test windows without one are dropped)
        parts[name] = Split(X=np.ascontiguousarray(X, dtype=np.float32), y=y,
                            naive={"persistence": persistence, "seasonal": seasonal},
                            target_time=times.to_numpy()[jj] if len(s) else np.zeros(0, dtype="datetime64[ns]"),
                            loc=loc, scale=scale)
    if len(parts["train"]) == 0 or len(parts["test"]) == 0:
        raise DataFileError(origin, f"site {shown_name(site)} yields {len(parts['train'])} training and {len(parts['test'])} test windows "
                            f"with the test start {pd.Timestamp(test_start)}",
                            "choose a test start with complete windows of the site on both sides of it, or provide a longer "
                            "record without long gaps for this site", time_column)
    info = {"split_time": pd.Timestamp(test_start), "n_steps": n, "interpolated": int(n_filled), "missing_steps": missing_raw,
            "start": times[0], "end": times[-1], "scaling": "per-window", **t_meta, **(meta or {})}
    return SiteData(site=site, train=parts["train"], test=parts["test"], meta=info)


class NoTestStart(DataFileError):
    """An own forecasting file was opened without a test start (``--test-start`` / ``CITYFED_TEST_START``)."""


def _env_test_start() -> pd.Timestamp | None:
    """The test start in ``CITYFED_TEST_START``, or ``None`` when it is unset or empty."""
    value = os.environ.get(TEST_START_ENV)
    if value is None or not value.strip():
        return None
    try:
        return parse_test_start(value)
    except ValueError as exc:
        raise DataFileError(f"the environment variable {TEST_START_ENV}", str(exc),
                            f"set {TEST_START_ENV} to {TEST_START_FORMAT}, or unset it and pass --test-start",
                            setting=TEST_START_ENV) from None


class ForecastingDataset(DepartmentDataset):
    """A forecasting department: sites split at a public test start, not at a share of their range.

    Parameters
    ----------
    path : str or os.PathLike, optional
        ``None`` for the bundled data, or the operator's own file (see :class:`DepartmentDataset`).
    seed : int
        Kept for the common signature; the split is time ordered.
    test_start : str, datetime or pandas.Timestamp, optional
        First time of the test period (:func:`parse_test_start`), the same for every site of the
        file. Default: the bundled sites' own constants (:attr:`bundled_test_start`); for an own
        file the environment variable ``CITYFED_TEST_START`` (``fl-client --test-start`` sets it for
        the node's ClientApp processes), and an own file with neither is refused.
    date_format, ranges
        As for :class:`DepartmentDataset`.
    test_fraction : None
        Refused when given: a share of a site's time range moves with its first and last reading.

    Raises
    ------
    ValueError
        A bad ``test_start`` argument, or a ``test_fraction`` (the caller names its option).
    DataFileError
        As :class:`DepartmentDataset`; also an own file without a test start, or a bad
        ``CITYFED_TEST_START`` (``setting`` set to the variable); the former as :class:`NoTestStart`.
    """

    #: Public test start of each bundled site: the time three quarters into its bundled time range
    #: (the split every table in the README was measured on), fixed here so that it is configuration,
    #: not a function of the records.
    bundled_test_start: ClassVar[dict[str, str]] = {}

    def __init__(self, path=None, *, seed: int = 0, test_fraction: float | None = None, test_start=None,
                 date_format: str | None = None, ranges=None):
        if test_fraction is not None:
            raise ValueError(f"test_fraction: a {self.department} site is split at a public test start, not at a share of its "
                             "time range (one reading added after the last would move the cut); pass test_start")
        explicit = None if test_start is None else parse_test_start(test_start)
        super().__init__(path, seed=seed, date_format=date_format, ranges=ranges)
        self.test_fraction = None  # not used: the split is at the test start
        self.test_start = explicit if explicit is not None or path is None else _env_test_start()
        if path is not None and self.test_start is None:
            raise NoTestStart(
                self._origin, "no test start is set for this forecasting file",
                f"pass --test-start {TEST_START_FORMAT} (or set {TEST_START_ENV}): the first time of the test period, "
                "usually about the last quarter of the file's range, kept the same for every run (a share of the file's "
                "own range would move with one reading added after the last)",
                self.schema.time_column)

    def site_test_start(self, site: str) -> pd.Timestamp:
        """The test start of ``site``: the configured one, else the bundled site's constant."""
        if self.test_start is not None:
            return self.test_start
        return parse_test_start(self.bundled_test_start[site])
