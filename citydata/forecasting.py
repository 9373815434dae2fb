"""Sliding-window forecasting data shared by the traffic and utility departments.

Per site: the series lies on a regular grid; short target gaps (<= ``MAX_GAP`` steps) are
interpolated linearly; the last ``test_fraction`` of the time range is the test period;
scalers are fitted on the training period only; windows whose inputs, targets or
seasonal-naive reference contain a missing value are dropped (with a warning).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .base import DataFileError, SiteData, Split, shown_name, warn_quality

#: Longest run of missing target steps that is filled by linear interpolation.
MAX_GAP = 4


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
    padded = np.concatenate([[False], nan, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]  # run = [start, end)
    filled = 0
    for a, b in zip(starts, ends):
        if b - a > max_gap or a == 0 or b == len(v):
            continue
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


def _fit_scaler(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return 0.0, 1.0
    mean, std = float(v.mean()), float(v.std())
    if not np.isfinite(std) or std <= 1e-12:
        std = 1.0
    return mean, std


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
    test_fraction: float,
    train_stride: int = 1,
    temperature: np.ndarray | None = None,
    with_temperature: bool = False,
    origin: str = "",
    time_column: str = "timestamp",
    meta: dict | None = None,
) -> SiteData:
    """Windows, scalers and naive baselines of one site.

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
    test_fraction : float
        Share of the grid (from the end) that forms the test period.
    train_stride : int
        Keep every ``train_stride``-th training window (test windows: all).
    temperature : np.ndarray, optional
        Raw temperature on the grid (NaN where missing); only used when ``with_temperature``.
    with_temperature : bool
        Add the scaled temperature and the 0/1 temperature-available channels.
    origin : str
        File (or "bundled ...") for messages.
    time_column : str
        Name of the time column, for error messages.
    meta : dict, optional
        Extra entries for :attr:`SiteData.meta`.

    Returns
    -------
    SiteData
        ``X`` is ``(n, lookback, channels)``: scaled target, hour sin/cos, weekday sin/cos
        [, scaled temperature, temperature flag]; ``y`` is ``(n, horizon)`` scaled target.
    """
    n = len(times)
    missing_raw = int(np.isnan(target).sum())
    y_raw, n_filled = interpolate_short_gaps(target)
    if n_filled:
        warn_quality(f"{origin}: site {shown_name(site)}: interpolated {n_filled} missing target value(s) "
                     f"in gaps of at most {MAX_GAP} steps (of {missing_raw} missing on the {n}-step grid)", stacklevel=5)
    cut = int(round(n * (1.0 - test_fraction)))
    mean, std = _fit_scaler(y_raw[:cut])
    if not np.isfinite(y_raw[:cut]).any():
        raise DataFileError(origin, f"site {shown_name(site)} has no target value in its training period", "provide data for the earlier part of the time range", time_column)
    scaled = (y_raw - mean) / std

    channels = [scaled[:, None], calendar_channels(times)]
    t_meta = {}
    if with_temperature:
        temp = np.full(n, np.nan) if temperature is None else np.asarray(temperature, dtype=np.float64)
        avail = np.isfinite(temp)
        if avail.any() and not avail[:cut].any():
            warn_quality(f"{origin}: site {shown_name(site)}: temperature only present in the test period "
                         f"({int(avail.sum())} values); it cannot be scaled from training data and is treated as unavailable", stacklevel=5)
            avail[:] = False
        t_mean, t_std = _fit_scaler(np.where(avail[:cut], temp[:cut], np.nan))
        t_scaled = np.where(avail, (np.nan_to_num(temp) - t_mean) / t_std, 0.0)
        channels += [t_scaled[:, None], avail.astype(np.float64)[:, None]]
        t_meta = {"temperature_mean": t_mean, "temperature_std": t_std, "temperature_available": float(avail.mean())}
    feats = np.concatenate(channels, axis=1).astype(np.float32)

    L, H, P = lookback, horizon, period
    bad = ~np.isfinite(scaled)
    starts = np.arange(max(0, P - L), n - L - H + 1)  # first target index j = s + L; seasonal ref j - P >= 0
    j = starts + L
    in_bad = _window_sums(bad, L)[starts]
    out_bad = _window_sums(bad, H)[j]
    seas_bad = _window_sums(bad, H)[j - P]
    ok = (in_bad == 0) & (out_bad == 0) & (seas_bad == 0)
    is_train = j + H <= cut
    is_test = j >= cut

    parts = {}
    for name, sel in (("train", is_train), ("test", is_test)):
        dropped = int((sel & ~ok).sum())
        if dropped:
            warn_quality(f"{origin}: site {shown_name(site)}: dropped {dropped} of {int(sel.sum())} {name} windows that contain "
                         f"missing values (in inputs, targets or the seasonal-naive reference) after interpolating short gaps", stacklevel=5)
        s = starts[sel & ok]
        if name == "train" and train_stride > 1:
            s = s[::train_stride]
        jj = s + L
        X = feats[s[:, None] + np.arange(L)[None, :]] if len(s) else np.zeros((0, L, feats.shape[1]), np.float32)
        hor = jj[:, None] + np.arange(H)[None, :]
        y = scaled[hor].astype(np.float32) if len(s) else np.zeros((0, H), np.float32)
        persistence = np.repeat(scaled[jj - 1][:, None], H, axis=1).astype(np.float32) if len(s) else np.zeros((0, H), np.float32)
        seasonal = scaled[hor - P].astype(np.float32) if len(s) else np.zeros((0, H), np.float32)
        parts[name] = Split(X=np.ascontiguousarray(X, dtype=np.float32), y=y,
                            naive={"persistence": persistence, "seasonal": seasonal},
                            target_time=times.to_numpy()[jj] if len(s) else np.zeros(0, dtype="datetime64[ns]"))
    if len(parts["train"]) == 0 or len(parts["test"]) == 0:
        raise DataFileError(origin, f"site {shown_name(site)} yields {len(parts['train'])} training and {len(parts['test'])} test windows",
                            "provide a longer record without long gaps for this site", time_column)
    info = {"split_time": times[cut], "n_steps": n, "interpolated": int(n_filled), "missing_steps": missing_raw,
            "start": times[0], "end": times[-1], **t_meta, **(meta or {})}
    return SiteData(site=site, train=parts["train"], test=parts["test"], target_mean=mean, target_std=std, meta=info)
