"""Traffic department: 15-minute vehicle counts per detector (one site per detector).

Bundled data: ``traffic_anomaly`` 2.5.4, ``traffic_anomaly/data/sample_counts.parquet``
(MIT): Oregon DOT counts at one intersection, 22 detectors, 2024-04-18 to 2024-05-13.
Task: from the last 8 h (32 steps) forecast the next hour (4 steps).
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from .base import (Column, DataFileError, Schema, SiteData, check_site_names, check_time_order,
                   drop_missing_keys, package_file, package_version, rows_text, validate_frame, warn_quality,
                   whole_numbers)
from .forecasting import ForecastingDataset, build_forecast_site

__all__ = ["TrafficCounts"]

_DIST, _FILE = "traffic-anomaly", "traffic_anomaly/data/sample_counts.parquet"


@functools.lru_cache(maxsize=1)
def _bundled() -> pd.DataFrame:
    raw = pd.read_parquet(package_file(_DIST, _FILE))
    frame = pd.DataFrame({
        "timestamp": pd.to_datetime(raw["timestamp"]).astype("datetime64[ns]"),
        "detector": raw["detector"].astype("int64"),
        "total": raw["total"].astype("float64"),
        "intersection": raw["intersection"].astype("int64"),
    })
    # the bundled file is not sorted; operator files must be
    return frame.sort_values(["detector", "timestamp"], kind="stable").reset_index(drop=True)


class TrafficCounts(ForecastingDataset):
    """Vehicle counts per detector, forecast one hour ahead.

    Parameters
    ----------
    path : str or os.PathLike, optional
        ``None`` for the bundled Oregon DOT counts, or an operator CSV/Parquet file with columns
        ``timestamp``, ``detector``, ``total`` (see :attr:`schema`), sorted by time within each
        detector, one record per detector and 15-minute bin.
    seed : int
    test_start : str or datetime, optional
        First time of the test period (:class:`~citydata.forecasting.ForecastingDataset`); the
        bundled detectors' is 2024-05-07 12:00. Required for an own file (or ``CITYFED_TEST_START``).
    """

    department = "traffic"
    bundled_test_start = {f"detector-{k}": "2024-05-07 12:00" for k in (1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 15, 16, 17, 18, 19, 20,
                                                                         21, 22, 23, 27, 28)}
    schema = Schema(
        department="traffic",
        task="forecasting",
        columns=(
            Column("timestamp", "datetime", "", "start of the 15-minute counting bin (local time)"),
            Column("detector", "category", "", "detector id (one site per detector)"),
            Column("total", "int", "vehicles / 15 min", "vehicles counted in the bin (empty if not recorded)", plausible=(0, 10_000)),
            Column("intersection", "int", "", "intersection id (informational)", required=False),
        ),
        site_column="detector",
        target="total",
        target_unit="vehicles / 15 min",
        time_column="timestamp",
        step="15min",
        lookback=32,
        horizon=4,
        seasonal_period=96,
        n_features=5,
        scale_floor=1.0,  # one vehicle per bin: a closed lane's flat lookback is not blown up
        relative_scale_floor=0.5,  # scale >= half the lookback mean count (measured: README, forecasting scaling)
    )
    #: Channel names of ``X[..., k]``.
    channels = ("total_window_scaled", "hour_sin", "hour_cos", "dow_sin", "dow_cos")

    @classmethod
    def source(cls) -> dict:
        """Provenance of the bundled counts (package, version, licence, rows, sites, description)."""
        return {
            "package": _DIST,
            "version": package_version(_DIST),
            "licence": "MIT",
            "file": _FILE,
            "rows": 54824,
            "sites": 22,
            "description": "Oregon DOT 15-minute vehicle counts, one intersection, 22 detectors, 2024-04-18 to 2024-05-13",
        }

    def _bundled_frame(self) -> pd.DataFrame:
        return _bundled().copy()

    def _validate(self, frame: pd.DataFrame, path) -> pd.DataFrame:
        out = self._validate_frame(frame, path)
        neg = out["total"] < 0
        if neg.any():
            rows = out.index[neg]
            raise DataFileError(path, f"{int(neg.sum())} negative count(s) at {rows_text(rows)}",
                                "counts are vehicles per bin and cannot be negative; leave unknown counts empty", "total")
        out = drop_missing_keys(out, ["detector"], path)
        check_site_names(out, "detector", path)
        # detector ids: whole numbers stay integers (sites read "detector-15"), anything else is text
        det = pd.to_numeric(out["detector"], errors="coerce")
        is_whole = whole_numbers(out["detector"])  # "INF", "1e30": numbers to pandas, but no int64 holds them
        if is_whole.all():
            out["detector"] = det.astype("int64")
        else:  # text ids; a whole number among them keeps its integer spelling (3.0 read from a CSV: "3")
            text = out["detector"].astype(str)
            text[is_whole] = det[is_whole].astype("int64").astype(str)
            out["detector"] = text
        check_time_order(out, "detector", "timestamp", path)
        t = out["timestamp"]
        off = t != t.dt.floor("15min")
        if off.any():
            rows = out.index[off]
            raise DataFileError(path, f"{int(off.sum())} timestamp(s) not on a 15-minute boundary at {rows_text(rows)}",
                                "aggregate the counts into 15-minute bins starting at :00, :15, :30 and :45", "timestamp")
        missing = int(out["total"].isna().sum())
        if missing:
            warn_quality(f"{path}: {missing} record(s) have no 'total'; short gaps are interpolated and windows with "
                         "remaining gaps are dropped (see per-detector warnings)", stacklevel=4)
        return out.reset_index(drop=True)

    def _site_name(self, key) -> str:
        return f"detector-{key}"

    def _sort_key(self, key):
        try:
            return (0, float(key), "")
        except (TypeError, ValueError):
            return (1, 0.0, str(key))

    def _build_site(self, site: str, records: pd.DataFrame) -> SiteData:
        times = pd.DatetimeIndex(records["timestamp"])
        grid = pd.date_range(times[0], times[-1], freq=self.schema.step)
        target = pd.Series(records["total"].to_numpy(dtype=np.float64), index=times).reindex(grid).to_numpy()
        s = self.schema
        return build_forecast_site(site, grid, target, lookback=s.lookback, horizon=s.horizon, period=s.seasonal_period,
                                   test_start=self.site_test_start(site), scale_floor=s.scale_floor,
                                   relative_scale_floor=s.relative_scale_floor, origin=self._origin,
                                   meta={"unit": s.target_unit, "records": len(records)})
