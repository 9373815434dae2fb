"""Forecasting sites: each window's sample depends on that window's own readings alone.

DP-SGD's guarantee and the node's privacy ledger account for neighbouring training sets that
differ in ONE training sample (for traffic and utility: one window). That covers a reading of
the node's file only if the preprocessing is local: changing (or removing) one reading may
change the samples ``(X, y)`` of the windows that contain it, and no other window's sample,
nor which other windows exist. A scaler fitted on the site's whole training period breaks
this (one reading moves the mean and std, hence every window's scaled values); so do a
training-window stride counted over the surviving windows and a gap interpolated from a
reading outside the window.

These tests change or remove readings of one site's file and compare every window, keyed by
its first target time, bitwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from citydata import ElectricityDemand, TrafficCounts
from citydata.forecasting import MAX_GAP

pytestmark = pytest.mark.filterwarnings("ignore::citydata.DataQualityWarning")


@pytest.fixture(scope="module")
def traffic_frame() -> pd.DataFrame:
    f = TrafficCounts().raw_frame()
    return f[f["detector"] == 15].reset_index(drop=True)


@pytest.fixture(scope="module")
def utility_frame() -> pd.DataFrame:
    return ElectricityDemand().raw_frame()


def _windows(cls, records: pd.DataFrame, path: Path, site: str) -> dict[str, dict]:
    """``{"train"/"test": {first target time: (X, y)}}`` of ``site`` built from ``records``."""
    records.to_parquet(path, index=False)
    d = cls(path, test_start=cls.bundled_test_start[site]).site_data(site)
    out = {}
    for name, part in (("train", d.train), ("test", d.test)):
        times = part.target_time.astype("datetime64[ns]").astype(np.int64)
        assert len(set(times.tolist())) == len(times)
        out[name] = {int(t): (part.X[k], part.y[k]) for k, t in enumerate(times)}
    return out


def _assert_local(cls, before: dict, after: dict, first: pd.Timestamp, last: pd.Timestamp, *, may_drop: bool = False) -> int:
    """Windows not overlapping ``[first, last]`` (grid steps): present and bitwise unchanged; returns how many overlapping ones changed."""
    s = cls.schema
    step = pd.Timedelta(s.step)
    lo, hi = first.value, last.value
    changed = 0
    for name in ("train", "test"):
        b, a = before[name], after[name]
        assert set(a) <= set(b), f"{name}: a changed reading created a window"
        for t, (X, y) in b.items():
            start, end = t - s.lookback * step.value, t + (s.horizon - 1) * step.value  # the window's steps
            overlaps = start <= hi and end >= lo
            ref = t - s.seasonal_period * step.value
            ref_gap = may_drop and name == "test" and ref <= hi and ref + (s.horizon - 1) * step.value >= lo
            if not overlaps:
                # a test window is scored against its seasonal-naive reference, which may lie before its
                # lookback (traffic): it is dropped when that reference is missing (not a training sample)
                assert t in a or ref_gap, f"{name}: a window that does not contain the changed reading disappeared"
                if t not in a:
                    continue
                X1, y1 = a[t]
                assert X1.tobytes() == X.tobytes(), f"{name}: inputs of a window that does not contain the reading changed"
                assert y1.tobytes() == y.tobytes(), f"{name}: targets of a window that does not contain the reading changed"
            elif t not in a:
                assert may_drop, f"{name}: a window disappeared although the change left no gap"
                changed += 1
            else:
                changed += int(a[t][0].tobytes() != X.tobytes() or a[t][1].tobytes() != y.tobytes())
    return changed


def _picks(times: pd.Series, split: pd.Timestamp) -> list[int]:
    """Rows of readings early, mid-training, just before and after the split, and in the test period."""
    t = times.reset_index(drop=True)
    before = np.flatnonzero((t < split).to_numpy())
    after = np.flatnonzero((t >= split).to_numpy())
    return [int(before[len(before) // 10]), int(before[len(before) // 2]), int(before[-3]), int(after[2]),
            int(after[len(after) // 2])]


def test_traffic_changing_one_count_changes_only_its_windows(traffic_frame, tmp_path):
    base = _windows(TrafficCounts, traffic_frame, tmp_path / "base.parquet", "detector-15")
    split = TrafficCounts(tmp_path / "base.parquet", test_start=TrafficCounts.bundled_test_start["detector-15"]).site_data("detector-15").meta["split_time"]
    for row in _picks(traffic_frame["timestamp"], split):
        f = traffic_frame.copy()
        f.loc[row, "total"] = f.loc[row, "total"] * 2 + 7
        after = _windows(TrafficCounts, f, tmp_path / f"changed-{row}.parquet", "detector-15")
        t = pd.Timestamp(f.loc[row, "timestamp"])
        assert _assert_local(TrafficCounts, base, after, t, t) > 0


def test_traffic_removing_readings_changes_only_their_windows(traffic_frame, tmp_path):
    base = _windows(TrafficCounts, traffic_frame, tmp_path / "base.parquet", "detector-15")
    split = TrafficCounts(tmp_path / "base.parquet", test_start=TrafficCounts.bundled_test_start["detector-15"]).site_data("detector-15").meta["split_time"]
    for row in _picks(traffic_frame["timestamp"], split)[:3]:
        for k in (1, MAX_GAP + 1):  # one reading (interpolated) and a gap too long to fill (windows dropped)
            f = traffic_frame.copy()
            f.loc[row:row + k - 1, "total"] = np.nan
            after = _windows(TrafficCounts, f, tmp_path / f"gap-{row}-{k}.parquet", "detector-15")
            _assert_local(TrafficCounts, base, after, pd.Timestamp(f.loc[row, "timestamp"]),
                          pd.Timestamp(f.loc[row + k - 1, "timestamp"]), may_drop=True)


@pytest.mark.parametrize("site,column", [("victoria-2014", "demand"), ("victoria-2014", "temperature"),
                                         ("portugal-2012", "demand")])
def test_utility_changing_one_reading_changes_only_its_windows(utility_frame, tmp_path, site, column):
    records = utility_frame[utility_frame["grid"] == site].reset_index(drop=True)
    base = _windows(ElectricityDemand, records, tmp_path / "base.parquet", site)
    split = ElectricityDemand(tmp_path / "base.parquet", test_start=ElectricityDemand.bundled_test_start[site]).site_data(site)
    rows = _picks(records["timestamp"], split.meta["split_time"])
    if site == "portugal-2012":  # the reading right after an interpolated daylight-saving gap
        gap = np.flatnonzero(records["demand"].isna().to_numpy())
        assert len(gap)
        rows.append(int(gap[0]) + 1)
    for row in rows:
        f = records.copy()
        f.loc[row, column] = f.loc[row, column] * 1.5 + 1
        after = _windows(ElectricityDemand, f, tmp_path / f"changed-{row}.parquet", site)
        hour = pd.Timestamp(f.loc[row, "timestamp"]).floor("1h")
        n = _assert_local(ElectricityDemand, base, after, hour, hour)
        assert n > 0


def test_utility_removing_readings_keeps_the_training_stride(utility_frame, tmp_path):
    """A gap too long to fill drops its windows; the kept training windows elsewhere stay the same ones."""
    site = "victoria-2014"
    records = utility_frame[utility_frame["grid"] == site].reset_index(drop=True)
    base = _windows(ElectricityDemand, records, tmp_path / "base.parquet", site)
    row = len(records) // 3
    f = records.copy()
    f.loc[row:row + 2 * (MAX_GAP + 2), "demand"] = np.nan  # half-hourly rows: > MAX_GAP missing hours
    after = _windows(ElectricityDemand, f, tmp_path / "gap.parquet", site)
    first = pd.Timestamp(f.loc[row, "timestamp"]).floor("1h")
    last = pd.Timestamp(f.loc[row + 2 * (MAX_GAP + 2), "timestamp"]).floor("1h")
    assert _assert_local(ElectricityDemand, base, after, first, last, may_drop=True) > 0


@pytest.mark.parametrize("site", ["portugal-2012", "victoria-2014"])
def test_utility_removing_a_sites_first_hour_keeps_every_other_training_window(utility_frame, tmp_path, site):
    """The training stride's phase is public (steps since 1970-01-01 00:00), not counted from the site's first reading.

    Found by an independent privacy review (2026-12-07): on 4516f3f the phase was counted from the
    grid's start, the site's first timestamp, so removing that one reading (an hourly grid) moved
    every utility training window: 6,544 of 6,545 changed. Windows near the train/test cut may
    still move with the site's time range (README: the cut follows the first and last timestamp).
    """
    records = utility_frame[utility_frame["grid"] == site].reset_index(drop=True)
    base = _windows(ElectricityDemand, records, tmp_path / "base.parquet", site)
    first_hour = pd.Timestamp(records.loc[0, "timestamp"]).floor("1h")
    keep = pd.to_datetime(records["timestamp"]).dt.floor("1h") != first_hour
    after = _windows(ElectricityDemand, records[keep].reset_index(drop=True), tmp_path / "after.parquet", site)
    s = ElectricityDemand.schema
    step = pd.Timedelta(s.step).value
    split = ElectricityDemand(tmp_path / "base.parquet", test_start=ElectricityDemand.bundled_test_start[site]).site_data(site).meta["split_time"]
    far = pd.Timestamp(split).value - (s.horizon + 2) * step  # clear of where the cut may move
    checked = 0
    for t, (X, y) in base["train"].items():
        contains = t - s.lookback * step <= first_hour.value
        if contains or t >= far:
            continue
        assert t in after["train"], "a training window that does not hold the removed reading disappeared"
        assert after["train"][t][0].tobytes() == X.tobytes() and after["train"][t][1].tobytes() == y.tobytes()
        checked += 1
    assert checked > 1000
    assert not {t for t in after["train"] if t < far} - set(base["train"]), "training windows appeared"
