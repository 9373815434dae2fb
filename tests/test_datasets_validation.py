"""Operator files: every bad-file case raises DataFileError naming the file, the column and the fix."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citydata import (DataFileError, DataQualityWarning, ElectricityDemand, HeartDisease, TrafficCounts,
                              load_department)
from citydata.forecasting import interpolate_short_gaps
from forecast_files import own, quarter_start

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
    tr = own(TrafficCounts, _write(_traffic_frame(), tmp_path / f"c{suffix}"))
    assert tr.sites == ["detector-1", "detector-2"]
    assert tr.site_data("detector-2").train.X.shape[1:] == (32, 5)
    ut = own(ElectricityDemand, _write(_utility_frame(), tmp_path / f"u{suffix}"))
    assert ut.sites == ["north", "south"]
    north, south = ut.site_data("north"), ut.site_data("south")
    assert north.train.X[:, :, 6].min() == 1 and south.train.X[:, :, 6].max() == 0


def test_utility_without_temperature_column_and_half_hourly(tmp_path):
    f = _utility_frame().drop(columns="temperature")
    ut = own(ElectricityDemand, _write(f, tmp_path / "u.csv"))
    assert ut.site_data("north").train.X.shape[1:] == (72, 7)
    half = pd.DataFrame({"timestamp": pd.date_range("2020-01-01", periods=48 * 30, freq="30min"), "grid": "g", "demand": np.arange(48 * 30.0)})
    d = own(ElectricityDemand, _write(half, tmp_path / "h.csv")).site_data("g")
    assert d.train.to_original(d.train.y)[0, 0] == pytest.approx((2 * 72 + 2 * 72 + 1) / 2)  # mean of the two half-hours
    daily = half.iloc[::48]
    _expect(ElectricityDemand, _write(daily, tmp_path / "d.csv"), "timestamp", "recorded every 1 days")


def test_gaps_interpolated_and_windows_dropped_with_warnings(tmp_path):
    f = _traffic_frame(n_days=4, detectors=(7,))
    f.loc[100:101, "total"] = np.nan  # short gap: interpolated
    f.loc[200:230, "total"] = np.nan  # long gap: windows dropped
    with pytest.warns(DataQualityWarning, match="33 record"):
        ds = own(TrafficCounts, _write(f.drop(index=range(300, 305)), tmp_path / "g.csv"))  # 5 missing records on the grid
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
        ds = own(TrafficCounts, _write(f, tmp_path / "m.csv"))
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
    assert "at row 11" in err.problem and "twelve" not in str(err)  # rows, never the record's values
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
    assert "at row 8" in err.problem and "yesterday-ish" not in str(err)
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
    assert own(ElectricityDemand, _write(u, tmp_path / f"ok{suffix}")).sites == ["north", "south"]
    u = _utility_frame().iloc[::-1]  # ... but time must increase within each grid
    _expect(ElectricityDemand, _write(u, tmp_path / f"u{suffix}"), "timestamp", "not sorted")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_duplicate_timestamps(tmp_path, suffix):
    f = _traffic_frame()
    f = pd.concat([f.iloc[:50], f.iloc[49:]], ignore_index=True)
    f.loc[50, "total"] += 1  # same detector and time, a different count: which one is right?
    err = _expect(TrafficCounts, _write(f, tmp_path / f"t{suffix}"), "timestamp", "duplicate timestamp")
    assert "rows 50 and 51" in err.problem and "different values" in err.problem and "daylight-saving" in err.fix
    u = _utility_frame()
    u = pd.concat([u.iloc[:10], u.iloc[9:]], ignore_index=True)
    u.loc[10, "demand"] = 1.0
    _expect(ElectricityDemand, _write(u, tmp_path / f"u{suffix}"), "timestamp", "duplicate timestamp")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_exact_duplicate_rows_are_dropped_with_a_count(tmp_path, suffix, heart_frame):
    f = _traffic_frame()
    ref = _site_arrays(own(TrafficCounts, _write(f, tmp_path / f"ref{suffix}")))
    g = pd.concat([f.iloc[:50], f.iloc[49:52], f.iloc[50:]], ignore_index=True)  # data rows 50, 51, 52 repeated once (as rows 51, 54, 55)
    with pytest.warns(DataQualityWarning, match=r"dropped 3 of 579 rows that repeat an earlier row exactly \(rows 51, 54, 55\)"):
        ds = own(TrafficCounts, _write(g, tmp_path / f"dup{suffix}"))
    _same_arrays(_site_arrays(ds), ref)
    h = pd.concat([heart_frame, heart_frame.iloc[[7]]], ignore_index=True)
    with pytest.warns(DataQualityWarning, match=r"dropped 1 of 921 rows .*\(row 921\)"):
        assert len(HeartDisease(_write(h, tmp_path / f"h{suffix}")).raw_frame()) == 920


def test_duplicated_column_names_are_an_error(tmp_path, heart_frame):
    p = tmp_path / "dup.csv"
    f = _traffic_frame()
    f.to_csv(p, index=False)
    text = p.read_text().splitlines()
    p.write_text("\n".join([text[0] + ",total "] + [line + ",1" for line in text[1:]]) + "\n")
    err = _expect(TrafficCounts, p, "total", "duplicated column name")
    assert "'total' at columns 3, 4" in err.problem and "remove the copies" in err.fix
    import pyarrow as pa
    import pyarrow.parquet as pq

    h = heart_frame
    table = pa.Table.from_arrays([pa.array(h[c].astype(str)) for c in h.columns] + [pa.array(h["age"])],
                                 names=list(h.columns) + ["age"])
    pq.write_table(table, tmp_path / "dup.parquet")
    _expect(HeartDisease, tmp_path / "dup.parquet", "age", "duplicated column name")


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
    ds = own(TrafficCounts, _write(short, tmp_path / "short.csv"))
    with pytest.raises(DataFileError, match="detector-1"):
        ds.site_data("detector-1")


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("ident", ["INF", "-inf", "Infinity", "1e30", "9223372036854775808"])
def test_traffic_detector_ids_that_look_numeric_but_are_not_whole_numbers_stay_text(tmp_path, suffix, ident):
    """A detector id such as ``INF`` or ``1e30`` parses as a float that is not a representable
    whole number: it is kept as text, as written (``detector-INF``; the CSV reader once read it as
    the float inf: ``detector-inf``), never cast to int64 (which raised pandas' IntCastingNaNError,
    or overflowed, and reached the loader's guard as an "unexpected" error; found by the hypothesis
    corpus in test_loader_properties), and the other detectors keep their names."""
    f = _traffic_frame(detectors=(3,)).astype({"detector": object})
    f.loc[f.index[:3], "detector"] = ident
    ds = own(TrafficCounts, _write(f, tmp_path / f"ids{suffix}"))
    assert "detector-3" in ds.sites and len(ds.sites) == 2
    other = next(s for s in ds.sites if s != "detector-3")
    assert other == f"detector-{ident}"


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


# ----------------------------------------------------------------------------- issue 11: bad input classes


def _site_arrays(ds) -> dict:
    out = {}
    for s in ds.sites:
        d = ds.site_data(s)
        for part in ("train", "test"):
            sp = getattr(d, part)
            assert np.isfinite(sp.X).all() and np.isfinite(sp.y).all(), (s, part)
            out[(s, part)] = (sp.X, sp.y)
    return out


def _same_arrays(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k][0], b[k][0])
        np.testing.assert_array_equal(a[k][1], b[k][1])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_utc_offsets_are_converted_to_utc(tmp_path, suffix):
    f = _traffic_frame()
    utc = own(TrafficCounts, _write(f, tmp_path / f"naive{suffix}"))  # naive timestamps = the reference
    for name, shifted in (("plus2", (f["timestamp"] + pd.Timedelta("2h")).dt.strftime("%Y-%m-%dT%H:%M:%S+02:00")),
                          ("zulu", f["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")),
                          ("minus0530", (f["timestamp"] - pd.Timedelta("5h30min")).dt.strftime("%Y-%m-%d %H:%M-0530"))):
        g = f.copy()
        g["timestamp"] = shifted
        ds = own(TrafficCounts, _write(g, tmp_path / f"{name}{suffix}"))
        pd.testing.assert_series_equal(ds.raw_frame()["timestamp"], utc.raw_frame()["timestamp"])
        _same_arrays(_site_arrays(ds), _site_arrays(utc))


def test_tz_aware_parquet_columns_are_converted_to_utc(tmp_path):
    f = _traffic_frame()
    ref = _site_arrays(own(TrafficCounts, _write(f, tmp_path / "ref.parquet")))
    g = f.copy()
    g["timestamp"] = g["timestamp"].dt.tz_localize("UTC").dt.tz_convert("Asia/Kolkata")
    ds = own(TrafficCounts, _write(g, tmp_path / "aware.parquet"))
    assert ds.raw_frame()["timestamp"].dt.tz is None
    _same_arrays(_site_arrays(ds), ref)
    u = _utility_frame()  # 2020-01-01 .. 2020-01-30: no DST change; shift it across the March change
    u["timestamp"] = (u["timestamp"] + pd.Timedelta("80D")).dt.tz_localize("UTC").dt.tz_convert("Europe/Berlin")
    with pytest.warns(DataQualityWarning, match=r"different UTC offsets .*\+01:00.*converted to UTC") as rec:
        own(ElectricityDemand, _write(u, tmp_path / "dst.parquet"))
    assert "'timestamp'" in str(rec[0].message)


def test_daylight_saving_local_times_load_with_offsets(tmp_path):
    t = pd.date_range("2024-10-26", periods=96 * 3 + 4, freq="15min", tz="Europe/Berlin")  # 27 Oct: 02:00-02:45 twice; +02:00 for the first 27 h; +02:00 for the first 27 h
    f = pd.DataFrame({"timestamp": t.map(lambda x: x.isoformat()), "detector": 1, "total": np.arange(len(t)) % 9})
    with pytest.warns(DataQualityWarning, match=r"2 different UTC offsets \(\+01:00 on 184 row\(s\), \+02:00 on 108 row\(s\)\)"):
        ds = own(TrafficCounts, _write(f, tmp_path / "dst.csv"))
    assert ds.raw_frame()["timestamp"].diff().dropna().eq(pd.Timedelta("15min")).all()  # a regular UTC grid
    naive = f.assign(timestamp=t.tz_localize(None).astype(str))
    assert "daylight-saving" in _expect(TrafficCounts, _write(naive, tmp_path / "naive.csv"), "timestamp", "not sorted").fix


def test_mixed_offsets_warn_and_mixed_naive_aware_is_an_error(tmp_path):
    f = _utility_frame()
    t = f["timestamp"].dt.tz_localize("UTC")
    text = t.dt.tz_convert("Europe/Berlin").map(lambda x: x.isoformat())
    text[:100] = t[:100].dt.tz_convert("Europe/London").map(lambda x: x.isoformat())  # other offsets, same instants
    f["timestamp"] = text
    with pytest.warns(DataQualityWarning, match=r"1440 timestamp\(s\) with 2 different UTC offsets"):
        ds = own(ElectricityDemand, _write(f, tmp_path / "mix.csv"))
    assert (ds.raw_frame()["timestamp"].iloc[:720] == pd.date_range("2020-01-01", periods=720, freq="1h")).all()
    g = _utility_frame()
    g["timestamp"] = g["timestamp"].astype(str)
    g.loc[10, "timestamp"] = "2020-01-01 10:00:00+00:00"
    err = _expect(ElectricityDemand, _write(g, tmp_path / "naive-aware.csv"), "timestamp", "carry a UTC offset")
    assert "carry a UTC offset (row 11)" in err.problem and "2020-01-01" not in str(err) and "none (local time)" in err.fix


def test_day_first_dates_need_a_date_format(tmp_path):
    f = _utility_frame()
    ref = _site_arrays(own(ElectricityDemand, _write(f, tmp_path / "iso.csv")))
    dmy = f.copy()
    dmy["timestamp"] = f["timestamp"].dt.strftime("%d/%m/%Y %H:%M")
    path = _write(dmy, tmp_path / "dmy.csv")
    err = _expect(ElectricityDemand, path, "timestamp", "not year-first")
    assert "(rows 1, 2, 3, 4, 5 and 1435 more)" in err.problem and "--date-format DMY" in err.fix
    assert "rows 289, 290" in err.problem and "can only be day-first" in err.problem and "/2020" not in str(err)
    _same_arrays(_site_arrays(own(ElectricityDemand, path, test_start=quarter_start(f), date_format="DMY")), ref)
    err = _expect_with(ElectricityDemand, path, "timestamp", "month above 12", date_format="MDY")
    assert "at rows 289, 290" in err.problem and "/2020" not in str(err) and "--date-format DMY" in err.fix
    mdy = f.copy()
    mdy["timestamp"] = f["timestamp"].dt.strftime("%m-%d-%Y %H:%M")
    _same_arrays(_site_arrays(own(ElectricityDemand, _write(mdy, tmp_path / "mdy.csv"), test_start=quarter_start(f), date_format="mdy")), ref)
    dotted = f.copy()
    dotted["timestamp"] = f["timestamp"].dt.strftime("%d.%m.%Y um %H.%M")
    p = _write(dotted, tmp_path / "pattern.csv")
    _same_arrays(_site_arrays(own(ElectricityDemand, p, test_start=quarter_start(f), date_format="%d.%m.%Y um %H.%M")), ref)
    err = _expect_with(ElectricityDemand, p, "timestamp", "do not match", date_format="%d/%m/%Y %H:%M")
    assert "at rows 1, 2" in err.problem and "2020" not in str(err)
    with pytest.raises(ValueError, match="unknown date format 'european'"):
        ElectricityDemand(p, date_format="european")
    with pytest.raises(ValueError, match="has no year"):
        ElectricityDemand(p, date_format="%d.%m. um %H.%M")
    old = dotted.assign(timestamp=f["timestamp"].dt.strftime("%d.%m.1850 um %H.%M"))
    err = _expect_with(ElectricityDemand, _write(old, tmp_path / "y1850.csv"), "timestamp", "outside the years",
                       date_format="%d.%m.%Y um %H.%M")
    assert "at rows 1, 2" in err.problem and "1850 um" not in str(err)


def test_ambiguous_only_dates_are_an_error_without_format(tmp_path):
    f = _traffic_frame(n_days=3)
    f = f[f["timestamp"].dt.day <= 3].copy()  # 01/04 .. 03/04: every value is ambiguous
    f["timestamp"] = f["timestamp"].dt.strftime("%m/%d/%Y %H:%M")
    err = _expect(TrafficCounts, _write(f, tmp_path / "amb.csv"), "timestamp", "cannot be told apart")
    assert "no date format was given" in err.problem
    assert own(TrafficCounts, tmp_path / "amb.csv", date_format="MDY").raw_frame()["timestamp"].iloc[0] == pd.Timestamp("2024-04-01")
    f2 = f.copy()
    f2["timestamp"] = "31/02/2024 00:00"
    _expect_with(TrafficCounts, _write(f2, tmp_path / "feb.csv"), "timestamp", "impossible day", date_format="DMY")
    f3 = _traffic_frame(n_days=3)
    f3["timestamp"] = f3["timestamp"].dt.strftime("%d/%m/%y %H:%M")
    _expect_with(TrafficCounts, _write(f3, tmp_path / "yy.csv"), "timestamp", "4-digit year", date_format="DMY")
    f4 = _traffic_frame(n_days=3)
    f4["timestamp"] = f4["timestamp"].dt.strftime("2204-%m-%d %H:%M")
    _expect(TrafficCounts, _write(f4, tmp_path / "y2204.csv"), "timestamp", "outside the years 1900-2100")


def _expect_with(cls, path, column, match, **kw) -> DataFileError:
    with pytest.raises(DataFileError) as info:
        cls(path, **kw)
    err = info.value
    assert err.path == str(path) and err.column == column and repr(column) in str(err)
    assert match in err.problem, err.problem
    return err


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_huge_and_implausible_values_are_errors(tmp_path, suffix, heart_frame):
    for cls, frame, col, value, shown in (
            (ElectricityDemand, _utility_frame(), "demand", 1e300, "1e+300"),
            (ElectricityDemand, _utility_frame(), "temperature", 451.0, "451.0"),
            (TrafficCounts, _traffic_frame().astype({"total": "float64"}), "total", 1e300, "1e+300"),
            (HeartDisease, heart_frame, "age", 1e9, "1000000000.0"),
            (HeartDisease, heart_frame, "trestbps", -120.0, "-120.0"),
            (HeartDisease, heart_frame, "oldpeak", 1e300, "1e+300")):
        f = frame.copy()
        f.loc[5, col] = value
        err = _expect(cls, _write(f, tmp_path / f"{col}{suffix}"), col, "outside the plausible range")
        assert err.problem.endswith(" at row 6") and shown not in str(err), err.problem  # the row, never the value
        assert "--ranges" in err.fix
    f = heart_frame.copy()
    f.loc[3, "trestbps"] = -1
    assert "1 negative" in _expect(HeartDisease, _write(f, tmp_path / f"neg{suffix}"), "trestbps").problem


def test_ranges_file_overrides_the_defaults(tmp_path, heart_frame):
    f = heart_frame.copy()
    f.loc[5, "chol"] = 1500.0
    path = _write(f, tmp_path / "h.csv")
    _expect(HeartDisease, path, "chol", "0 to 1000 mg/dl")
    wide = tmp_path / "wide.toml"
    wide.write_text("[chol]\nmax = 2000\n")
    assert HeartDisease(path, ranges=wide).raw_frame()["chol"].max() == 1500.0
    drop = tmp_path / "drop.toml"
    drop.write_text('[chol]\naction = "missing"\n')
    with pytest.warns(DataQualityWarning, match=r"column 'chol': 1 value\(s\) outside the plausible range 0 to 1000 mg/dl .*treated as missing"):
        ds = HeartDisease(path, ranges=drop)
    assert np.isnan(ds.raw_frame()["chol"][5])
    narrow = tmp_path / "narrow.toml"
    narrow.write_text("[age]\nmin = 40\n")
    _expect(HeartDisease, path, "chol")
    assert "below 40" in _expect_with(HeartDisease, _write(heart_frame, tmp_path / "ok.csv"), "age", "outside", ranges=narrow).problem
    for text, column, needle in (("[chole]\nmax = 3\n", "chole", "did you mean 'chol'"),
                                 ("[sex]\nmax = 3\n", "sex", "only numeric columns"),
                                 ("[num]\nmax = 9\n", "num", "no plausibility range to change"),
                                 ("[chol]\nmax = inf\n", "chol", "finite"),
                                 ("[chol]\nmax = 1e300\n", "chol", "finite"),
                                 ("[chol]\nmax = '9'\n", "chol", "not a number"),
                                 ("[chol]\nmin = 5\nmax = 1\n", "chol", "above max"),
                                 ("[chol]\nmaximum = 5\n", "chol", "did you mean 'max'"),
                                 ('[chol]\naction = "drop"\n', "chol", "action"),
                                 ("chol = 5\n", "chol", "not a table"),
                                 ("[chol\n", None, "not valid TOML")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(DataFileError) as info:
            HeartDisease(path, ranges=bad)
        assert info.value.path == str(bad) and info.value.column == column and needle in str(info.value), str(info.value)
    with pytest.raises(DataFileError, match="cannot read the ranges file"):
        HeartDisease(path, ranges=tmp_path / "none.toml")


def test_ranges_from_the_environment(tmp_path, heart_frame, monkeypatch):
    f = heart_frame.copy()
    f.loc[5, "chol"] = 1500.0
    path = _write(f, tmp_path / "h.csv")
    wide = tmp_path / "wide.toml"
    wide.write_text("[chol]\nmax = 2000\n")
    monkeypatch.setenv("CITYFED_RANGES", str(wide))
    assert HeartDisease(path).raw_frame()["chol"].max() == 1500.0
    monkeypatch.delenv("CITYFED_RANGES")  # a ranges file is one department's
    monkeypatch.setenv("CITYFED_DATE_FORMAT", "DMY")
    u = _utility_frame()
    u["timestamp"] = u["timestamp"].dt.strftime("%d/%m/%Y %H:%M")
    assert own(ElectricityDemand, _write(u, tmp_path / "u.csv")).sites == ["north", "south"]


def test_arrays_stay_finite_even_with_a_wide_range(tmp_path):
    f = _utility_frame()
    f.loc[5, "demand"] = 1e15
    f.loc[6, "demand"] = -1e15
    ds = own(ElectricityDemand, _write(f, tmp_path / "u.csv"), ranges={"demand": {"min": -1e15, "max": 1e15}})
    _site_arrays(ds)  # finite (asserted inside): float64 scaling, float32 arrays
    huge = {"demand": {"min": -1e300, "max": 1e300}}
    with pytest.raises(DataFileError, match="finite"):
        ElectricityDemand(tmp_path / "u.csv", ranges=huge)


def test_single_class_site_is_an_error(tmp_path, heart_frame):
    f = heart_frame.copy()
    f.loc[f["dataset"] == "Hungary", "num"] = 0
    ds = HeartDisease(_write(f, tmp_path / "h.csv"))
    ds.site_data("Cleveland")
    with pytest.raises(DataFileError) as info:
        ds.site_data("Hungary")
    assert info.value.column == "num" and "'Hungary'" in info.value.problem and "one class" in info.value.problem


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.filterwarnings("ignore::citydata.DataQualityWarning")  # imputation counts of the tiny sites
def test_too_few_records_for_a_split_or_a_batch(tmp_path, suffix, heart_frame):
    for n in (1, 3, 20):
        f = pd.concat([heart_frame[heart_frame["dataset"] != "Switzerland"],
                       heart_frame[heart_frame["dataset"] == "Switzerland"].iloc[:n]], ignore_index=True)
        ds = HeartDisease(_write(f, tmp_path / f"h{n}{suffix}"))
        with pytest.raises(DataFileError) as info:
            ds.site_data("Switzerland")
        assert info.value.column in ("dataset", "num") and "'Switzerland'" in str(info.value), str(info.value)
    ok = heart_frame[heart_frame["dataset"] == "Switzerland"].iloc[:40]
    ok = ok.assign(num=[0, 1] * 20)
    d = HeartDisease(_write(ok, tmp_path / f"ok{suffix}")).site_data("Switzerland")
    assert len(d.train) >= 16 and len(d.test) >= 1
    t = _traffic_frame(n_days=2, detectors=(1,)).iloc[:140]  # 35 h: 5 training windows before the test start at 3/4 of it, on the hour (each needs 8 h + a day of history)
    with pytest.raises(DataFileError, match=r"'detector-1' yields 5 training and 33 test windows; .*at least 16") as info:
        own(TrafficCounts, _write(t, tmp_path / f"t{suffix}")).site_data("detector-1")
    assert info.value.column == "detector"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_missing_markers_are_counted_not_vanished(tmp_path, suffix):
    half = pd.DataFrame({"timestamp": pd.date_range("2020-01-01", periods=48 * 30, freq="30min"), "grid": "g",
                         "demand": (100 + np.arange(48 * 30.0) % 7).astype(object)})
    half.loc[[7, 8, 100], "demand"] = ["n/a", "NULL", " "]
    half.loc[300, "demand"] = None
    with pytest.warns(DataQualityWarning) as rec:
        ds = own(ElectricityDemand, _write(half, tmp_path / f"na{suffix}"))
        ds.site_data("g")
    text = " ".join(str(w.message) for w in rec)
    assert "4 record(s) have no 'demand'" in text, text
    assert "4 hour(s)" in text and "from fewer records" in text, text


def test_rows_longer_than_the_header(tmp_path):
    p = tmp_path / "ragged.csv"
    f = _traffic_frame(n_days=3)
    f.to_csv(p, index=False)
    lines = p.read_text().splitlines()
    lines[1] += ",7,8"  # a stray comma or two in the first row: pandas would silently make the first fields an index
    p.write_text("\n".join(lines) + "\n")
    assert "more values than the header has column names (3)" in _expect(TrafficCounts, p, None).problem
    lines[1] = lines[2]
    lines[5] += ",7,8"  # further down: the CSV reader says where
    p.write_text("\n".join(lines) + "\n")
    assert "Expected 3 fields in line 6, saw 5" in _expect(TrafficCounts, p, None).problem


@pytest.mark.parametrize("kind", ["dir", "devnull", "fifo"])
def test_directory_or_device_is_not_called_missing(tmp_path, kind):
    import os

    if kind == "dir":
        p = tmp_path / "records.csv"
        p.mkdir()
        what = "is a directory"
    elif kind == "devnull":
        p = Path(os.devnull)
        what = "is a character device"
    else:
        p = tmp_path / "pipe.csv"
        os.mkfifo(p)
        what = "named pipe"
    with pytest.raises(DataFileError) as info:
        HeartDisease(p)
    assert what in info.value.problem and "not found" not in str(info.value)


# ----------------------------------------------------------------------------- fl-sim baselines --date-format / --ranges


def test_fl_sim_baselines_date_format_and_ranges(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from simulations import cli as sim_cli

    monkeypatch.delenv("CITYFED_DATE_FORMAT", raising=False)
    monkeypatch.delenv("CITYFED_RANGES", raising=False)
    monkeypatch.delenv("CITYFED_TEST_START", raising=False)
    f = _traffic_frame(n_days=4, detectors=(1,))
    f["timestamp"] = f["timestamp"].dt.strftime("%d/%m/%Y %H:%M")
    path = _write(f, tmp_path / "dmy.csv")
    runner = CliRunner()
    base = ["baselines", "-d", "traffic", "--data", str(path), "-o", str(tmp_path / "out"), "--model", "gru", "--epochs", "1",
            "--epsilon", "3", "--test-start", "2024-04-04"]
    res = runner.invoke(sim_cli.app, base)
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "column 'timestamp'" in text and "--date-format DMY" in text, text
    res = runner.invoke(sim_cli.app, base + ["--date-format", "nope"])
    assert res.exit_code == 2 and "--date-format" in res.output
    ranges = tmp_path / "ranges.toml"
    ranges.write_text("[total]\nmax = 10\n")  # the file's counts reach 29: now out of range
    res = runner.invoke(sim_cli.app, base + ["--date-format", "DMY", "--ranges", str(ranges)])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "column 'total'" in text and "above 10" in text, text
    ranges.write_text("[detector]\nmax = 3\n")  # the message names the table as [detector]: text, not rich markup
    res = runner.invoke(sim_cli.app, base + ["--date-format", "DMY", "--ranges", str(ranges)])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "fix: remove [detector]" in text, text
    seen = {}

    def fake_run_baselines(department, *, data=None, seed=0, **kw):  # the jobs reopen the file like simulations.baselines
        ds = load_department(department, data, seed=seed)
        seen["timestamps"] = ds.raw_frame()["timestamp"]
        return []

    monkeypatch.setattr("simulations.baselines.run_baselines", fake_run_baselines)
    res = runner.invoke(sim_cli.app, base + ["--date-format", "DMY"])
    assert res.exit_code == 0, res.output
    assert (seen["timestamps"] == pd.date_range("2024-04-01", periods=96 * 4, freq="15min")).all()
    assert (tmp_path / "out" / "results.json").exists()
    assert "CITYFED_DATE_FORMAT" not in __import__("os").environ  # set for the command only


def test_ranges_file_with_a_byte_order_mark_says_so(tmp_path, heart_frame):
    """A ranges file saved as 'UTF-8 with BOM' is refused naming the BOM, as fl-client does for a policy file."""
    path = _write(heart_frame, tmp_path / "h.csv")
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[chol]\nmax = 1200\n")
    with pytest.raises(DataFileError) as info:
        HeartDisease(path, ranges=bom)
    err = info.value
    assert err.path == str(bom) and "byte-order mark (BOM)" in err.problem, str(err)
    assert "without BOM" in err.fix and "not valid TOML" not in str(err), str(err)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_missing_column_names_a_close_spelling(tmp_path, suffix, heart_frame):
    """``thalach`` (the UCI spelling of ``thalch``) and other close spellings are named in the fix."""
    err = _expect(HeartDisease, _write(heart_frame.rename(columns={"thalch": "thalach"}), tmp_path / f"h{suffix}"),
                  "thalch", "missing required column")
    assert "rename column 'thalach' to 'thalch'" in err.fix, err.fix
    err = _expect(TrafficCounts, _write(_traffic_frame().rename(columns={"total": "totl"}), tmp_path / f"t{suffix}"),
                  "total", "missing required column")
    assert "rename column 'totl' to 'total'" in err.fix, err.fix


def test_close_spelling_is_not_quoted_from_a_headerless_file(tmp_path):
    """Without one documented column name the first line is not a header: nothing from it is quoted."""
    path = tmp_path / "noheader.csv"
    frame = _traffic_frame()
    frame["detector"] = "totals"  # a site name close to 'total', in the first record
    frame.to_csv(path, index=False, header=False)
    err = _expect(TrafficCounts, path, "timestamp", "missing required column")
    assert "totals" not in str(err), str(err)


_WRONG_TYPES = {  # Parquet column kinds, made for n rows
    "datetime": lambda n: pd.Series(pd.date_range("2020-01-01", periods=n, freq="h")),
    "datetime_tz": lambda n: pd.Series(pd.date_range("2020-01-01", periods=n, freq="h", tz="UTC")),
    "timedelta": lambda n: pd.Series(pd.to_timedelta(np.arange(n), unit="h")),
    "bool": lambda n: pd.Series(np.arange(n) % 2 == 0),
    "date": lambda n: pd.Series(pd.date_range("2020-01-01", periods=n, freq="D").date),
    "bytes": lambda n: pd.Series([b"ab"] * n),
    "int": lambda n: pd.Series(np.arange(n) % 50 + 1, dtype="int64"),
}


@pytest.mark.parametrize(("column", "kind", "words", "expected"), [
    ("age", "datetime", "dates/times (datetime64", "expected a whole number (years)"),
    ("age", "datetime_tz", "dates/times (datetime64", "expected a whole number (years)"),
    ("chol", "timedelta", "durations (timedelta64", "expected a number (mg/dl)"),
    ("thalch", "bool", "true/false values (bool", "expected a number (bpm)"),
    ("trestbps", "date", "dates (date", "expected a number (mm Hg)"),
    ("oldpeak", "bytes", "binary values (bytes", "expected a number (mm)"),
    ("fbs", "datetime", "dates/times (datetime64", "expected true/false"),
    ("exang", "timedelta", "durations (timedelta64", "expected true/false"),
    ("sex", "datetime", "dates/times (datetime64", "expected text"),
    ("cp", "bool", "true/false values (bool", "expected text"),
])
def test_parquet_column_of_the_wrong_type_is_named_as_such(tmp_path, heart_frame, column, kind, words, expected):
    f = heart_frame.copy()
    f[column] = _WRONG_TYPES[kind](len(f)).to_numpy() if kind != "date" else _WRONG_TYPES[kind](len(f))
    path = tmp_path / "h.parquet"
    f.to_parquet(path, index=False)
    err = _expect(HeartDisease, path, column)
    assert words in err.problem and expected in err.problem, err.problem
    assert "outside" not in err.problem and "unknown value" not in err.problem, err.problem


@pytest.mark.parametrize(("column", "kind", "words", "expected"), [
    ("timestamp", "timedelta", "durations (timedelta64", "expected a timestamp"),
    ("timestamp", "bool", "true/false values (bool", "expected a timestamp"),
    ("total", "datetime", "dates/times (datetime64", "expected a whole number (vehicles / 15 min)"),
])
def test_traffic_parquet_column_of_the_wrong_type(tmp_path, column, kind, words, expected):
    f = _traffic_frame()
    f[column] = _WRONG_TYPES[kind](len(f)).to_numpy()
    path = tmp_path / "t.parquet"
    f.to_parquet(path, index=False)
    err = _expect(TrafficCounts, path, column)
    assert words in err.problem and expected in err.problem, err.problem
