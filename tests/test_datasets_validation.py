"""Operator files: every bad-file case raises DataFileError naming the file, the column and the fix."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.datasets import (DataFileError, DataQualityWarning, ElectricityDemand, HeartDisease, TrafficCounts,
                              load_department)
from clients.datasets.forecasting import interpolate_short_gaps

SUFFIXES = [".csv", ".parquet"]


def _traffic_frame(n_days: int = 3, detectors=(1, 2)) -> pd.DataFrame:
    t = pd.date_range("2024-04-01", periods=96 * n_days, freq="15min")
    rng = np.random.default_rng(0)
    parts = [pd.DataFrame({"timestamp": t, "detector": d, "total": rng.poisson(10 + 5 * np.sin(np.arange(len(t)) / 15) ** 2, len(t))})
             for d in detectors]
    return pd.concat(parts, ignore_index=True)


def _utility_frame(n_days: int = 30) -> pd.DataFrame:
    t = pd.date_range("2020-01-01", periods=24 * n_days, freq="1h")
    hours = np.arange(len(t))
    return pd.concat([
        pd.DataFrame({"timestamp": t, "grid": "north", "demand": 100 + 20 * np.sin(2 * np.pi * hours / 24), "temperature": 10.0 + hours % 7}),
        pd.DataFrame({"timestamp": t, "grid": "south", "demand": 50 + 5 * np.cos(2 * np.pi * hours / 24), "temperature": np.nan}),
    ], ignore_index=True)


@pytest.fixture(scope="module")
def heart_frame() -> pd.DataFrame:
    return HeartDisease().raw_frame()


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame = frame.copy()
        for c in frame.columns[frame.dtypes == object]:  # Parquet columns hold one type: mixed ones become text
            frame[c] = frame[c].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
        frame.to_parquet(path, index=False)
    return path


def _expect(cls, path, column, match=None) -> DataFileError:
    with pytest.raises(DataFileError) as info:
        cls(path)
    err = info.value
    assert str(path) in str(err) and err.path == str(path)
    assert err.column == column
    if column is not None:
        assert repr(column) in str(err)
    assert err.fix and "Fix:" in str(err)
    if match:
        assert match in err.problem, err.problem
    return err


# ----------------------------------------------------------------------------- good files


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_operator_files_load(tmp_path, suffix):
    tr = TrafficCounts(_write(_traffic_frame(), tmp_path / f"c{suffix}"))
    assert tr.sites == ["detector-1", "detector-2"]
    assert tr.site_data("detector-2").train.X.shape[1:] == (32, 5)
    ut = ElectricityDemand(_write(_utility_frame(), tmp_path / f"u{suffix}"))
    assert ut.sites == ["north", "south"]
    north, south = ut.site_data("north"), ut.site_data("south")
    assert north.train.X[:, :, 6].min() == 1 and south.train.X[:, :, 6].max() == 0


def test_utility_without_temperature_column_and_half_hourly(tmp_path):
    f = _utility_frame().drop(columns="temperature")
    ut = ElectricityDemand(_write(f, tmp_path / "u.csv"))
    assert ut.site_data("north").train.X.shape[1:] == (72, 7)
    half = pd.DataFrame({"timestamp": pd.date_range("2020-01-01", periods=48 * 30, freq="30min"), "grid": "g", "demand": np.arange(48 * 30.0)})
    d = ElectricityDemand(_write(half, tmp_path / "h.csv")).site_data("g")
    assert d.to_original(d.train.y[0, 0]) == pytest.approx((2 * 72 + 2 * 72 + 1) / 2)  # mean of the two half-hours
    daily = half.iloc[::48]
    _expect(ElectricityDemand, _write(daily, tmp_path / "d.csv"), "timestamp", "recorded every 1 days")


def test_gaps_interpolated_and_windows_dropped_with_warnings(tmp_path):
    f = _traffic_frame(n_days=4, detectors=(7,))
    f.loc[100:101, "total"] = np.nan  # short gap: interpolated
    f.loc[200:230, "total"] = np.nan  # long gap: windows dropped
    with pytest.warns(DataQualityWarning, match="33 record"):
        ds = TrafficCounts(_write(f.drop(index=range(300, 305)), tmp_path / "g.csv"))  # 5 missing records on the grid
    with pytest.warns(DataQualityWarning) as rec:
        d = ds.site_data("detector-7")
    text = " ".join(str(w.message) for w in rec)
    assert "interpolated 2 missing target value" in text
    assert "dropped" in text and "train windows" in text
    assert np.isfinite(d.train.X).all() and np.isfinite(d.train.y).all()


def test_missing_site_rows_dropped_with_warning(tmp_path):
    f = _traffic_frame()
    f["detector"] = f["detector"].astype(object)
    f.loc[5, "detector"] = None
    f = f.drop(index=5)  # keep time order of detector 1 intact, then add a record without detector at the end
    f = pd.concat([f, pd.DataFrame({"timestamp": [pd.Timestamp("2024-04-01")], "detector": [None], "total": [3]})], ignore_index=True)
    with pytest.warns(DataQualityWarning, match="dropped 1 of"):
        ds = TrafficCounts(_write(f, tmp_path / "m.csv"))
    assert ds.sites == ["detector-1", "detector-2"]


# ----------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_missing_required_column(tmp_path, suffix, heart_frame):
    _expect(TrafficCounts, _write(_traffic_frame().drop(columns="total"), tmp_path / f"t{suffix}"), "total", "missing required column")
    _expect(ElectricityDemand, _write(_utility_frame().drop(columns="demand"), tmp_path / f"u{suffix}"), "demand")
    _expect(HeartDisease, _write(heart_frame.drop(columns="age"), tmp_path / f"h{suffix}"), "age")
    err = _expect(TrafficCounts, _write(_traffic_frame().rename(columns={"total": "Total"}), tmp_path / f"r{suffix}"), "total")
    assert "rename column 'Total'" in err.fix


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_non_numeric_text_in_numeric_column(tmp_path, suffix, heart_frame):
    f = _traffic_frame()
    f["total"] = f["total"].astype(object)
    f.loc[10, "total"] = "twelve"
    err = _expect(TrafficCounts, _write(f, tmp_path / f"t{suffix}"), "total", "non-numeric")
    assert "'twelve' (row 11)" in err.problem
    h = heart_frame.copy()
    h["chol"] = h["chol"].astype(object)
    h.loc[3, "chol"] = "high"
    _expect(HeartDisease, _write(h, tmp_path / f"h{suffix}"), "chol", "non-numeric")
    u = _utility_frame()
    u["temperature"] = u["temperature"].astype(object)
    u.loc[0, "temperature"] = "warm"
    _expect(ElectricityDemand, _write(u, tmp_path / f"u{suffix}"), "temperature")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_unparsable_timestamps(tmp_path, suffix):
    f = _traffic_frame()
    f["timestamp"] = f["timestamp"].astype(str)
    f.loc[7, "timestamp"] = "yesterday-ish"
    err = _expect(TrafficCounts, _write(f, tmp_path / f"t{suffix}"), "timestamp", "unparsable timestamp")
    assert "yesterday-ish" in err.problem
    u = _utility_frame()
    u["timestamp"] = u["timestamp"].astype(str)
    u.loc[3, "timestamp"] = "2020-13-45 99:00"
    _expect(ElectricityDemand, _write(u, tmp_path / f"u{suffix}"), "timestamp")
    f = _traffic_frame()
    f["timestamp"] = np.arange(len(f)) * 900  # epoch seconds are not accepted silently
    _expect(TrafficCounts, _write(f, tmp_path / f"n{suffix}"), "timestamp", "timestamps are numbers")


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("cls", [TrafficCounts, ElectricityDemand, HeartDisease])
def test_empty_files(tmp_path, suffix, cls):
    zero = tmp_path / f"zero{suffix}"
    zero.write_bytes(b"")
    assert "0 bytes" in _expect(cls, zero, None).problem
    cols = [c.name for c in cls.schema.columns]
    header_only = _write(pd.DataFrame({c: pd.Series([], dtype="float64") for c in cols}), tmp_path / f"rows0{suffix}")
    assert "no data rows" in _expect(cls, header_only, None).problem


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_all_nan_column(tmp_path, suffix, heart_frame):
    f = _traffic_frame()
    f["total"] = np.nan
    _expect(TrafficCounts, _write(f, tmp_path / f"t{suffix}"), "total", "every value is missing")
    h = heart_frame.copy()
    h["thalch"] = np.nan
    _expect(HeartDisease, _write(h, tmp_path / f"h{suffix}"), "thalch", "every value is missing")
    u = _utility_frame()
    u["demand"] = np.nan
    _expect(ElectricityDemand, _write(u, tmp_path / f"u{suffix}"), "demand", "every value is missing")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_unsorted_timestamps(tmp_path, suffix):
    f = _traffic_frame()
    f.iloc[[20, 21]] = f.iloc[[21, 20]].to_numpy()
    err = _expect(TrafficCounts, _write(f, tmp_path / f"t{suffix}"), "timestamp", "not sorted")
    assert "detector '1'" in err.problem and "sort" in err.fix
    u = _utility_frame().sort_values("timestamp", kind="stable")  # interleaved grids are fine ...
    assert ElectricityDemand(_write(u, tmp_path / f"ok{suffix}")).sites == ["north", "south"]
    u = _utility_frame().iloc[::-1]  # ... but time must increase within each grid
    _expect(ElectricityDemand, _write(u, tmp_path / f"u{suffix}"), "timestamp", "not sorted")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_duplicate_timestamps(tmp_path, suffix):
    f = _traffic_frame()
    f = pd.concat([f.iloc[:50], f.iloc[49:]], ignore_index=True)
    err = _expect(TrafficCounts, _write(f, tmp_path / f"t{suffix}"), "timestamp", "duplicate timestamp")
    assert "rows 50 and 51" in err.problem
    u = _utility_frame()
    u = pd.concat([u.iloc[:10], u.iloc[9:]], ignore_index=True)
    _expect(ElectricityDemand, _write(u, tmp_path / f"u{suffix}"), "timestamp", "duplicate timestamp")


@pytest.mark.parametrize("name", ["a.xlsx", "a.json", "a", "a.csv.gz"])
def test_unsupported_suffix(tmp_path, name):
    p = tmp_path / name
    p.write_text("timestamp,detector,total\n")
    err = _expect(TrafficCounts, p, None, "unsupported file type")
    assert ".parquet" in err.fix


def test_file_not_found(tmp_path):
    p = tmp_path / "nope.csv"
    assert "not found" in _expect(HeartDisease, p, None).problem
    with pytest.raises(DataFileError, match="nope.parquet"):
        load_department("traffic", tmp_path / "nope.parquet")


def test_health_specific_rules(tmp_path, heart_frame):
    h = heart_frame.copy()
    h.loc[0, "cp"] = "crushing"
    assert "typical angina" in _expect(HeartDisease, _write(h, tmp_path / "a.csv"), "cp").fix
    h = heart_frame.copy()
    h.loc[0, "num"] = 7
    _expect(HeartDisease, _write(h, tmp_path / "b.csv"), "num", "outside 0-4")
    h = heart_frame.copy()
    h["fbs"] = h["fbs"].astype(object)
    h.loc[0, "fbs"] = "maybe"
    _expect(HeartDisease, _write(h, tmp_path / "c.csv"), "fbs")
    h = heart_frame.copy()
    h.loc[1, "num"] = np.nan
    with pytest.warns(DataQualityWarning, match="dropped 1 of 920 patients"):
        ds = HeartDisease(_write(h, tmp_path / "d.csv"))
    assert len(ds.raw_frame()) == 919


def test_traffic_specific_rules(tmp_path):
    f = _traffic_frame()
    f.loc[3, "total"] = -1
    _expect(TrafficCounts, _write(f, tmp_path / "neg.csv"), "total", "negative")
    f = _traffic_frame().astype({"total": "float64"})
    f.loc[3, "total"] = 2.5
    _expect(TrafficCounts, _write(f, tmp_path / "frac.csv"), "total", "non-integer")
    f = _traffic_frame()
    f["timestamp"] = f["timestamp"] + pd.Timedelta("7min")
    _expect(TrafficCounts, _write(f, tmp_path / "off.csv"), "timestamp", "15-minute boundary")
    short = _traffic_frame(n_days=1)
    ds = TrafficCounts(_write(short, tmp_path / "short.csv"))
    with pytest.raises(DataFileError, match="detector-1"):
        ds.site_data("detector-1")


# ----------------------------------------------------------------------------- properties


_NA_STRINGS = {"", "#n/a", "#n/a n/a", "#na", "-1.#ind", "-1.#qnan", "-nan", "1.#ind", "1.#qnan", "<na>", "n/a", "na",
               "null", "nan", "none"}


def _is_junk(s: str) -> bool:
    t = s.strip()
    if t.lower() in _NA_STRINGS or t.lower().lstrip("+-") in _NA_STRINGS:
        return False
    try:
        float(t)
    except ValueError:
        return True
    return False


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12).filter(_is_junk),
       row=st.integers(0, 95), suffix=st.sampled_from(SUFFIXES))
def test_property_junk_in_numeric_column_always_rejected(junk, row, suffix):
    f = _traffic_frame(n_days=1, detectors=(3,))
    f["total"] = f["total"].astype(object)
    f.loc[row, "total"] = junk
    with tempfile.TemporaryDirectory() as d:
        path = _write(f, Path(d) / f"junk{suffix}")
        with pytest.raises(DataFileError) as info:
            TrafficCounts(path)
    assert info.value.column == "total" and "non-numeric" in info.value.problem


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(2, 40), suffix=st.sampled_from(SUFFIXES))
def test_property_shuffled_timestamps_always_rejected(data, n, suffix):
    perm = data.draw(st.permutations(list(range(n))).filter(lambda p: list(p) != sorted(p)))
    f = _traffic_frame(n_days=1, detectors=(4,)).iloc[:n]
    f = f.iloc[list(perm)]
    with tempfile.TemporaryDirectory() as d:
        path = _write(f, Path(d) / f"shuffled{suffix}")
        with pytest.raises(DataFileError) as info:
            TrafficCounts(path)
    assert info.value.column == "timestamp" and "not sorted" in info.value.problem


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.one_of(st.none(), st.floats(-1e6, 1e6)), min_size=1, max_size=60))
def test_property_interpolation_fills_only_short_interior_gaps(values):
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    out, n = interpolate_short_gaps(v, max_gap=4)
    known = ~np.isnan(v)
    np.testing.assert_array_equal(out[known], v[known])  # observed values untouched
    assert n == int((np.isnan(v) & ~np.isnan(out)).sum())
    # every remaining NaN belongs to a run that is at an edge or longer than 4
    isnan = np.isnan(out)
    i = 0
    while i < len(out):
        if isnan[i]:
            j = i
            while j < len(out) and isnan[j]:
                j += 1
            assert i == 0 or j == len(out) or j - i > 4
            i = j
        else:
            i += 1
