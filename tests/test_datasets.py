"""Department dataset adapters on the bundled real data: sizes, shapes, leakage, time split, round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from citydata import (DATASETS, DataQualityWarning, DepartmentDataset, ElectricityDemand, HeartDisease, SiteData,
                              TrafficCounts, load_department)

pytestmark = pytest.mark.filterwarnings("ignore::citydata.DataQualityWarning")


@pytest.fixture(scope="module")
def health():
    return HeartDisease()


@pytest.fixture(scope="module")
def traffic():
    return TrafficCounts()


@pytest.fixture(scope="module")
def utility():
    return ElectricityDemand()


def _same_split(a, b):
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)
    for stat in ("loc", "scale"):
        if getattr(a, stat) is not None or getattr(b, stat) is not None:
            np.testing.assert_array_equal(getattr(a, stat), getattr(b, stat))
    if a.naive is not None or b.naive is not None:
        assert a.naive.keys() == b.naive.keys()
        for k in a.naive:
            np.testing.assert_array_equal(a.naive[k], b.naive[k])


def _same_site(a: SiteData, b: SiteData):
    _same_split(a.train, b.train)
    _same_split(a.test, b.test)


# ----------------------------------------------------------------------------- registry


def test_registry_and_load_department():
    assert set(DATASETS) == {"health", "traffic", "utility"}
    for name, cls in DATASETS.items():
        assert issubclass(cls, DepartmentDataset)
        assert cls.schema.department == name == cls.department
        src = cls.source()
        assert {"package", "version", "licence", "rows", "sites", "description"} <= set(src)
        assert "not installed" not in src["version"]
        assert name in cls.schema.describe() or cls.schema.target in cls.schema.describe()
    with pytest.raises(ValueError, match="health, traffic, utility"):
        load_department("police")


def test_unknown_site_lists_valid_sites(health):
    with pytest.raises(ValueError, match="Cleveland"):
        health.site_data("Nowhere General")


def test_bad_test_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        HeartDisease(test_fraction=1.5)


# ----------------------------------------------------------------------------- health


def test_health_sites_and_sizes(health):
    assert health.sites == ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
    expected = {"Cleveland": 304, "Hungary": 293, "Switzerland": 123, "VA Long Beach": 200}
    total = 0
    for site, n in expected.items():
        d = health.site_data(site)
        assert len(d.train) + len(d.test) == n
        # ~1/3 test: one hash draw per patient (not stratified), so within 3.5 binomial standard deviations
        assert abs(len(d.test) / n - 1 / 3) < 3.5 * (2 / 9 / n) ** 0.5
        assert set(np.unique(d.train.y)) == {0.0, 1.0}
        for part in (d.train, d.test):
            assert part.X.dtype == np.float32 and part.y.dtype == np.float32
            assert part.X.shape == (len(part), HeartDisease.schema.n_features) == (len(part), 15)
            assert part.y.shape == (len(part),)
            assert set(np.unique(part.y)) <= {0.0, 1.0}
            assert np.isfinite(part.X).all()
        total += n
    assert total == 920 == HeartDisease.source()["rows"]
    x, y = health.load("Cleveland")[0]
    assert isinstance(x, torch.Tensor) and x.shape == (15,) and y.shape == ()
    assert len(health.load("Cleveland", train=False)) == len(health.site_data("Cleveland").test)


def test_health_one_hot_fixed_and_scaled_with_constants(health):
    from citydata.health import BINARY_MISSING, REFERENCE

    frame = health.raw_frame()
    for site in health.sites:
        d = health.site_data(site)
        X = np.concatenate([d.train.X, d.test.X])
        cp, restecg = X[:, 8:12], X[:, 12:15]
        assert set(np.unique(cp.sum(1))) <= {0.0, 1.0}  # 0: category missing (unknown)
        assert set(np.unique(restecg.sum(1))) <= {0.0, 1.0}
        assert set(np.unique(X[:, 5:8])) <= {0.0, BINARY_MISSING, 1.0}
        # numeric features scaled with the fixed reference constants, not the site's records
        rows = np.concatenate([d.meta["train_rows"], d.meta["test_rows"]])
        for j, (c, (center, scale)) in enumerate(REFERENCE.items()):
            raw = frame.loc[rows, c].to_numpy(dtype=np.float64)
            known = np.isfinite(raw) & ~((raw == 0) & (c in ("trestbps", "chol")))
            np.testing.assert_allclose(X[known, j], (raw[known] - center) / scale, rtol=1e-6, atol=1e-6)
            assert np.all(X[~known, j] == 0.0)  # missing: the center


def test_health_imputation_warns_with_counts():
    ds = HeartDisease()
    with pytest.warns(DataQualityWarning, match=r"imputed \d+ missing value"):
        ds.site_data("VA Long Beach")


def test_health_split_is_seeded():
    a, b, c = HeartDisease(seed=0), HeartDisease(seed=0), HeartDisease(seed=1)
    _same_site(a.site_data("Hungary"), b.site_data("Hungary"))
    assert not np.array_equal(a.site_data("Hungary").meta["test_rows"], c.site_data("Hungary").meta["test_rows"])


def test_health_no_cross_site_or_test_leakage(health, tmp_path):
    base = health.site_data("Cleveland")
    frame = health.raw_frame()
    # change every other hospital's records, and the features of Cleveland's test patients
    other = frame["dataset"] != "Cleveland"
    frame.loc[other, "chol"] = frame.loc[other, "chol"] * 3 + 50
    frame.loc[other, "num"] = 4 - frame.loc[other, "num"]
    test_rows = base.meta["test_rows"]
    frame.loc[test_rows, ["age", "trestbps", "chol", "thalch", "oldpeak"]] = 999.0
    frame.loc[test_rows, "cp"] = "typical angina"
    path = tmp_path / "heart.parquet"
    frame.to_parquet(path)
    wide = {c: {"min": -1e4, "max": 1e4} for c in ("age", "trestbps", "chol", "thalch", "oldpeak")}  # 999: implausible on purpose
    changed = HeartDisease(path, ranges=wide).site_data("Cleveland")
    # the split hashes each record's own values: a changed test record may change side, no other record moves
    kept = np.isin(changed.meta["train_rows"], base.meta["train_rows"])
    assert set(base.meta["train_rows"]) <= set(changed.meta["train_rows"])
    np.testing.assert_array_equal(base.train.X, changed.train.X[kept])
    np.testing.assert_array_equal(base.train.y, changed.train.y[kept])
    assert base.meta["scalers"] == changed.meta["scalers"]
    changed_rows = np.concatenate([changed.meta["train_rows"][~kept], changed.meta["test_rows"]])
    assert set(changed_rows) == set(test_rows)  # only the changed records, on either side
    assert not np.array_equal(base.test.X, changed.test.X)


# ----------------------------------------------------------------------------- forecasting


@pytest.mark.parametrize("name,n_sites", [("traffic", 22), ("utility", 3)])
def test_forecasting_sites_and_shapes(name, n_sites, request):
    ds = request.getfixturevalue(name)
    s = ds.schema
    assert len(ds.sites) == n_sites
    for site in ds.sites:
        d = ds.site_data(site)
        for part in (d.train, d.test):
            assert len(part) > 0
            assert part.X.dtype == np.float32 and part.y.dtype == np.float32
            assert part.X.shape == (len(part), s.lookback, s.n_features)
            assert part.y.shape == (len(part), s.horizon)
            assert np.isfinite(part.X).all() and np.isfinite(part.y).all()
            assert set(part.naive) == {"persistence", "seasonal"}
            for v in part.naive.values():
                assert v.shape == part.y.shape and np.isfinite(v).all()
            # persistence = last observed value (window units), from the input window
            np.testing.assert_array_equal(part.naive["persistence"], np.repeat(part.X[:, -1, :1], s.horizon, axis=1))
            xb, yb = part.tensors()[:2]
            assert xb.shape == (2, s.lookback, s.n_features) and yb.shape == (2, s.horizon)


def test_traffic_sites_named_by_detector(traffic):
    assert traffic.sites[:3] == ["detector-1", "detector-2", "detector-3"]
    assert "detector-15" in traffic.sites
    assert TrafficCounts.schema.lookback == 32 and TrafficCounts.schema.horizon == 4
    assert TrafficCounts.schema.seasonal_period == 96 and TrafficCounts.schema.n_features == 5


def test_utility_channels_and_seasonal_naive(utility):
    s = utility.schema
    assert utility.sites == ["england-wales-2000", "portugal-2012", "victoria-2014"]
    assert (s.lookback, s.horizon, s.seasonal_period, s.n_features) == (72, 24, 24, 7)
    for site in utility.sites:
        d = utility.site_data(site)
        X = d.train.X
        # seasonal naive = value one day before each target step; with lookback >= 24 it is in the input
        np.testing.assert_array_equal(d.train.naive["seasonal"], X[:, s.lookback - s.seasonal_period:, 0])
        flag = X[:, :, 6]
        assert set(np.unique(flag)) <= {0.0, 1.0}
        if site == "victoria-2014":
            assert flag.min() == 1.0 and X[:, :, 5].std() > 0.3  # (T - 15) / 10: Victoria's temperature spread
        else:
            assert flag.max() == 0.0 and np.all(X[:, :, 5] == 0)


def test_utility_hourly_resampling(utility):
    raw = utility.raw_frame()
    vic = raw[raw.grid == "victoria-2014"].set_index("timestamp")["demand"]
    hourly = vic.resample("1h").mean()
    d = utility.site_data("victoria-2014")
    assert d.meta["n_steps"] == 8760 == len(hourly)
    # first training target (after lookback 72 h) is the mean of the two half-hours of that hour
    t0 = pd.Timestamp(d.train.target_time[0])
    assert t0 == pd.Timestamp("2014-01-04 00:00")
    assert d.train.to_original(d.train.y)[0, 0] == pytest.approx(hourly[t0], rel=1e-5)


@pytest.mark.parametrize("name", ["traffic", "utility"])
def test_time_split(name, request):
    ds = request.getfixturevalue(name)
    step = pd.Timedelta(ds.schema.step)
    for site in ds.sites:
        d = ds.site_data(site)
        last_train_target = pd.Timestamp(d.train.target_time.max()) + (ds.schema.horizon - 1) * step
        first_test_target = pd.Timestamp(d.test.target_time.min())
        assert last_train_target < d.meta["split_time"] <= first_test_target
        assert np.all(np.diff(d.train.target_time) > np.timedelta64(0))
        # test period ~ the last quarter of the time range
        span = d.meta["end"] - d.meta["start"]
        assert abs((d.meta["end"] - d.meta["split_time"]) / span - 0.25) < 0.01


@pytest.mark.parametrize("name", ["traffic", "utility"])
def test_target_normalised_per_window(name, request):
    """Each window's target channel: mean 0 and std 1 over its own lookback (std above the floor); to_original undoes it."""
    ds = request.getfixturevalue(name)
    s = ds.schema
    raw = ds.raw_frame()
    sc = s.site_column
    for site in ds.sites[:3]:
        d = ds.site_data(site)
        key = ds._site_keys[site]
        rec = raw[raw[sc] == key].set_index("timestamp")[s.target].resample(s.step).mean()
        rec = rec.interpolate(limit_area="inside")  # the adapter fills the (short) gaps of the bundled data
        for part in (d.train, d.test):
            x0 = part.X[:, :, 0].astype(np.float64)
            np.testing.assert_allclose(x0.mean(axis=1), 0.0, atol=1e-5)
            floored = part.scale > np.sqrt(((part.to_original(x0) - part.loc[:, None]) ** 2).mean(axis=1)) * (1 + 1e-6)
            np.testing.assert_allclose(x0[~floored].std(axis=1), 1.0, rtol=1e-4)
            assert (part.scale >= s.scale_floor).all()
            idx = pd.DatetimeIndex(part.target_time[:5])
            np.testing.assert_allclose(part.to_original(part.y)[:5, 0], rec.loc[idx].to_numpy(),
                                       rtol=1e-5, atol=1e-5 * float(part.scale[:5].max()))
            lookback = np.stack([rec.loc[t - s.lookback * pd.Timedelta(s.step):t - pd.Timedelta(s.step)].to_numpy() for t in idx])
            np.testing.assert_allclose(part.loc[:5], lookback.mean(axis=1), rtol=1e-9)


def test_traffic_no_cross_site_or_test_period_leakage(traffic, tmp_path):
    site = "detector-15"
    base = traffic.site_data(site)
    frame = traffic.raw_frame()
    other = frame["detector"] != 15
    frame.loc[other, "total"] = frame.loc[other, "total"] * 5 + 7
    test_period = (frame["detector"] == 15) & (frame["timestamp"] >= base.meta["split_time"])
    frame.loc[test_period, "total"] = 1000.0
    path = tmp_path / "counts.parquet"
    frame.to_parquet(path)
    changed = TrafficCounts(path, test_start=base.meta["split_time"])
    d = changed.site_data(site)
    _same_split(base.train, d.train)
    assert not np.array_equal(base.test.y, d.test.y)
    other_new, other_old = changed.site_data("detector-16").test, traffic.site_data("detector-16").test
    assert not np.array_equal(other_new.loc, other_old.loc)


def test_utility_no_test_period_leakage_temperature(utility, tmp_path):
    site = "victoria-2014"
    base = utility.site_data(site)
    frame = utility.raw_frame()
    test_period = (frame["grid"] == site) & (frame["timestamp"] >= base.meta["split_time"])
    frame.loc[test_period, ["demand", "temperature"]] = [99.0, 60.0]
    frame.loc[frame["grid"] != site, "demand"] *= 2
    path = tmp_path / "grids.parquet"
    frame.to_parquet(path)
    d = ElectricityDemand(path, test_start=base.meta["split_time"]).site_data(site)
    _same_split(base.train, d.train)
    assert d.meta["temperature_reference"] == base.meta["temperature_reference"]


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("name", ["health", "traffic", "utility"])
def test_export_reload_round_trip(name, suffix, request, tmp_path):
    ds = request.getfixturevalue(name)
    path = ds.export(tmp_path / f"{name}{suffix}")
    starts = getattr(type(ds), "bundled_test_start", None)  # forecasting: the file's runs need the bundled test start
    again = type(ds)(path) if starts is None else type(ds)(path, test_start=next(iter(starts.values())))
    assert again.sites == ds.sites
    pd.testing.assert_frame_equal(again.raw_frame(), ds.raw_frame(), check_dtype=False)
    for site in ds.sites:
        site_again = again if starts is None else type(ds)(path, test_start=starts[site])  # utility's grids differ
        _same_site(ds.site_data(site), site_again.site_data(site))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("name", ["health", "traffic"])  # utility documents no int column
def test_export_writes_whole_number_columns_as_whole_numbers(name, suffix, request, tmp_path):
    """A column the schema documents as ``int`` is written as whole numbers (``63``, not ``63.0``),
    empty where the record has none, also when other records of it are missing (pandas holds such a
    column as float). The file still loads back to the same arrays (round trip above)."""
    ds = request.getfixturevalue(name)
    path = ds.export(tmp_path / f"{name}{suffix}")
    ints = [c.name for c in ds.schema.columns if c.dtype == "int" and c.name in ds.raw_frame().columns]
    assert ints, name
    if suffix == ".csv":
        text = pd.read_csv(path, dtype=str, keep_default_na=False)
        for col in ints:
            cells = text[col][text[col] != ""]
            assert len(cells) and cells.str.fullmatch(r"-?[0-9]+").all(), (col, cells[~cells.str.fullmatch(r"-?[0-9]+")].head())
            assert (text[col] == "").sum() == ds.raw_frame()[col].isna().sum(), col
    else:
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        for col in ints:
            assert str(schema.field(col).type) == "int64", (col, schema.field(col).type)
    starts = getattr(type(ds), "bundled_test_start", None)
    for site in ds.sites[:3]:
        again = type(ds)(path) if starts is None else type(ds)(path, test_start=starts[site])
        _same_site(ds.site_data(site), again.site_data(site))


def test_export_one_site_gives_that_sites_node_the_same_arrays(health, tmp_path):
    """`fl-sim export --site` writes one hospital's file; its node sees exactly its bundled arrays."""
    path = health.export(tmp_path / "valb.csv", sites=["VA Long Beach"])
    mine = type(health)(path)
    assert mine.sites == ["VA Long Beach"]
    assert set(pd.read_csv(path)["dataset"]) == {"VA Long Beach"}
    _same_site(health.site_data("VA Long Beach"), mine.site_data("VA Long Beach"))
    with pytest.raises(ValueError, match="unknown health site.*valid sites: Cleveland"):
        health.export(tmp_path / "x.csv", sites=["Nowhere"])



@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_that_fails_midway_leaves_the_earlier_file_and_no_partial(health, tmp_path, monkeypatch, suffix):
    """``Dataset.export`` (not only fl-sim's CLI) replaces a file only by a complete one: a write that fails
    part way (disk full, a kill) leaves the earlier file byte for byte and no temporary file beside it."""
    path = health.export(tmp_path / f"h{suffix}", sites=["Cleveland"])
    before = path.read_bytes()
    method = "to_csv" if suffix == ".csv" else "to_parquet"
    real = getattr(pd.DataFrame, method)

    def half_then_fail(self, target, *args, **kwargs):
        real(self.head(3), target, *args, **kwargs)  # a few records reach the disk, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, method, half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        health.export(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_fl_sim_export_cli(tmp_path):
    from typer.testing import CliRunner

    from simulations.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["export", "-d", "health", "--site", "Cleveland", "-o", str(tmp_path / "c.parquet")])
    assert res.exit_code == 0, res.output
    assert "Cleveland" in res.output and set(pd.read_parquet(tmp_path / "c.parquet")["dataset"]) == {"Cleveland"}
    res = runner.invoke(app, ["export", "-d", "health", "-o", str(tmp_path / "c.txt")])
    assert res.exit_code == 2 and "--out" in res.output and ".csv or .parquet" in res.output
