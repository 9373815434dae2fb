"""Common pieces of the department dataset adapters.

Every department (health, traffic, utility) is a :class:`DepartmentDataset`: it reads either
the real records bundled inside an installed package (``path=None``) or an operator's own
CSV/Parquet file in the documented :class:`Schema`, validates it (raising
:class:`DataFileError` with the file, the column and the fix), and turns each site's
records into :class:`SiteData` (train/test :class:`Split` arrays ready for PyTorch).

Nothing is dropped or imputed silently: such steps emit a :class:`DataQualityWarning`
that states the count.
"""

from __future__ import annotations

import abc
import importlib.metadata
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "Column",
    "DataFileError",
    "DataQualityWarning",
    "DepartmentDataset",
    "Schema",
    "SiteData",
    "Split",
    "SUPPORTED_SUFFIXES",
]

#: File suffixes accepted for operator files.
SUPPORTED_SUFFIXES = (".csv", ".parquet", ".pq")

_DTYPES = ("float", "int", "category", "datetime", "bool")


class DataFileError(ValueError):
    """Bad department data file.

    The message names the file, the column (if any) and the fix.

    Parameters
    ----------
    path : str or os.PathLike
        The offending file.
    problem : str
        What is wrong.
    fix : str
        What the operator should do about it.
    column : str, optional
        The offending column, when the problem is about one column.
    """

    def __init__(self, path, problem: str, fix: str, column: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        self.column = column
        where = f"{self.path}" + (f", column {column!r}" if column is not None else "")
        super().__init__(f"{where}: {problem}. Fix: {fix}")


class DataQualityWarning(UserWarning):
    """Records were dropped, imputed or interpolated (the message gives the count)."""


@dataclass(frozen=True)
class Column:
    """One documented column of a department file.

    Parameters
    ----------
    name : str
        Column name, exactly as it must appear in the file header.
    dtype : str
        ``"float"``, ``"int"``, ``"category"``, ``"datetime"`` or ``"bool"``.
    unit : str
        Physical unit (``""`` when not applicable).
    description : str
        Human readable meaning.
    required : bool
        Whether the column must be present in an operator file.
    """

    name: str
    dtype: str
    unit: str
    description: str
    required: bool = True

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"Column {self.name!r}: dtype must be one of {_DTYPES}, got {self.dtype!r}")


@dataclass(frozen=True)
class Schema:
    """Documented layout of a department's records and of the learning task built from them."""

    department: str
    task: str
    columns: tuple[Column, ...]
    site_column: str
    target: str
    target_unit: str
    time_column: str | None = None
    step: str | None = None
    lookback: int | None = None
    horizon: int | None = None
    seasonal_period: int | None = None
    n_features: int = 0
    train_stride: int = 1  # forecasting: keep every k-th training window (overlapping windows are near-duplicates)

    def column(self, name: str) -> Column:
        """Return the documented column called ``name`` (``KeyError`` if absent)."""
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def required_columns(self) -> list[str]:
        """Names of the columns an operator file must contain."""
        return [c.name for c in self.columns if c.required]

    def describe(self) -> str:
        """Human readable table of the file columns and the task.

        Returns
        -------
        str
            A fixed-width table (one line per column) followed by the task summary.
        """
        rows = [("column", "type", "unit", "required", "description")]
        for c in self.columns:
            rows.append((c.name, c.dtype, c.unit or "-", "yes" if c.required else "no", c.description))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = []
        for i, r in enumerate(rows):
            lines.append("  ".join(r[k].ljust(widths[k]) for k in range(4)) + "  " + r[4])
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 11)
        task = f"task: {self.task}; site column: {self.site_column!r}; target: {self.target!r} ({self.target_unit})"
        if self.task == "forecasting":
            task += (
                f"; step {self.step}, lookback {self.lookback} steps, horizon {self.horizon} steps, "
                f"seasonal period {self.seasonal_period} steps"
            )
        task += f"; {self.n_features} {'channels per step' if self.task == 'forecasting' else 'features'}"
        return "\n".join(lines + [task])


@dataclass
class Split:
    """Arrays of one site's train or test part.

    Attributes
    ----------
    X : np.ndarray
        float32; classification ``(n, n_features)``; forecasting ``(n, lookback, n_features)``
        with channel 0 the scaled target.
    y : np.ndarray
        float32; classification ``(n,)`` of 0/1; forecasting ``(n, horizon)`` scaled target.
    naive : dict of str to np.ndarray, optional
        Forecasting only: ``"persistence"`` and ``"seasonal"`` forecasts ``(n, horizon)`` in
        scaled units, computed only from values before each window's first target step.
    target_time : np.ndarray, optional
        Forecasting only: ``datetime64`` time of each window's first target step.
    """

    X: np.ndarray
    y: np.ndarray
    naive: dict[str, np.ndarray] | None = None
    target_time: np.ndarray | None = None

    def __len__(self) -> int:
        return int(len(self.y))

    def tensors(self) -> TensorDataset:
        """The split as a ``TensorDataset`` of ``(X, y)`` float32 tensors."""
        return TensorDataset(torch.from_numpy(np.ascontiguousarray(self.X, dtype=np.float32)),
                             torch.from_numpy(np.ascontiguousarray(self.y, dtype=np.float32)))


@dataclass
class SiteData:
    """One site's train and test splits plus the target scaler (forecasting).

    Attributes
    ----------
    site : str
    train, test : Split
    target_mean, target_std : float
        Forecasting: ``original = scaled * target_std + target_mean`` (fitted on the site's
        training period only). Classification: 0 and 1.
    meta : dict
        Extra facts about the site (units, split time, feature scalers, counts).
    """

    site: str
    train: Split
    test: Split
    target_mean: float = 0.0
    target_std: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_original(self, y_scaled: np.ndarray) -> np.ndarray:
        """Undo the target scaling.

        Parameters
        ----------
        y_scaled : np.ndarray
            Values in scaled units.

        Returns
        -------
        np.ndarray
            ``y_scaled * target_std + target_mean`` (original units).
        """
        return np.asarray(y_scaled, dtype=np.float64) * self.target_std + self.target_mean


# --------------------------------------------------------------------------------------
# reading and validating operator files
# --------------------------------------------------------------------------------------


def warn_quality(message: str, stacklevel: int = 3) -> None:
    """Emit a :class:`DataQualityWarning`."""
    warnings.warn(message, DataQualityWarning, stacklevel=stacklevel)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV or Parquet file, mapping every failure to :class:`DataFileError`.

    Parameters
    ----------
    path : str or os.PathLike
        ``.csv``, ``.parquet`` or ``.pq`` file.

    Returns
    -------
    pd.DataFrame
        The raw table (no type coercion beyond the reader's own).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataFileError(p, f"unsupported file type {p.suffix or '(no suffix)'!r}",
                            f"save the records as CSV (.csv) or Parquet (.parquet)")
    if not p.exists():
        raise DataFileError(p, "file not found", "check the path (it is resolved from the current directory "
                            f"{os.getcwd()!r})")
    if not p.is_file():
        raise DataFileError(p, "not a regular file", "pass the path of a single CSV or Parquet file")
    if p.stat().st_size == 0:
        raise DataFileError(p, "file is empty (0 bytes)", "export the records again; the file must have a header and data rows")
    try:
        if suffix == ".csv":
            frame = pd.read_csv(p, float_precision="round_trip", low_memory=False, skipinitialspace=True)
        else:
            frame = pd.read_parquet(p)
    except pd.errors.EmptyDataError:
        raise DataFileError(p, "file has no header and no rows", "write a header line with the documented column names") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataFileError(p, f"cannot parse the CSV ({exc})", "save it as UTF-8 CSV with a comma separator and one header line") from None
    except Exception as exc:  # pyarrow raises a variety of errors on corrupt files
        raise DataFileError(p, f"cannot read the file ({type(exc).__name__}: {exc})",
                            "check that the file is a valid, uncorrupted " + ("CSV" if suffix == ".csv" else "Parquet") + " file") from None
    frame.columns = [str(c).strip() if isinstance(c, str) else str(c) for c in frame.columns]
    return frame


def _examples(values: pd.Series, n: int = 3) -> str:
    parts = [f"{v!r} (row {i + 1})" for i, v in zip(values.index[:n], values.iloc[:n])]
    more = f" and {len(values) - n} more" if len(values) > n else ""
    return ", ".join(parts) + more


_TRUE = {"true", "1", "1.0", "yes", "y", "t"}
_FALSE = {"false", "0", "0.0", "no", "n", "f"}


def coerce_column(frame: pd.DataFrame, col: Column, path) -> pd.Series:
    """Coerce one column to its documented dtype or raise :class:`DataFileError`.

    Parameters
    ----------
    frame : pd.DataFrame
        Table with a positional (0..n-1) index; rows in the error are 1-based data rows.
    col : Column
        Documented column.
    path : path-like
        File name for the error message.

    Returns
    -------
    pd.Series
        ``float64`` (float/int), ``datetime64`` (datetime), nullable ``boolean`` (bool), or
        ``object`` strings (category). Missing values stay missing.
    """
    s = frame[col.name]
    present = s.notna()
    if col.dtype in ("float", "int"):
        if pd.api.types.is_bool_dtype(s.dtype):
            out = s.astype("float64")
        else:
            out = pd.to_numeric(s, errors="coerce")
            if s.dtype == object:
                # blank / whitespace-only strings are missing values, not junk
                blank = s.map(lambda v: isinstance(v, str) and v.strip() == "")
                present &= ~blank
            out = out.astype("float64")
        bad = present & out.isna()
        if bad.any():
            raise DataFileError(path, f"{int(bad.sum())} non-numeric value(s), e.g. {_examples(s[bad])}",
                                f"make every value of {col.name!r} a number ({col.unit or 'no unit'}) or leave it empty", col.name)
        inf = np.isinf(out.to_numpy())
        if inf.any():
            raise DataFileError(path, f"{int(inf.sum())} infinite value(s), e.g. {_examples(s[inf])}",
                                f"replace them with finite numbers or leave them empty", col.name)
        if col.dtype == "int":
            frac = out.notna() & (out != np.round(out))
            if frac.any():
                raise DataFileError(path, f"{int(frac.sum())} non-integer value(s), e.g. {_examples(s[frac])}",
                                    f"{col.name!r} holds whole numbers ({col.description})", col.name)
        return out
    if col.dtype == "datetime":
        if pd.api.types.is_datetime64_any_dtype(s.dtype):
            return s
        if pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype):
            raise DataFileError(path, f"timestamps are numbers (e.g. {_examples(s[present], 1)}), not dates",
                                "write timestamps as ISO 8601 text, e.g. '2024-04-18 00:15:00'", col.name)
        strict = None
        try:
            strict = pd.to_datetime(s)
        except (ValueError, TypeError, OverflowError):
            pass
        if strict is not None and pd.api.types.is_datetime64_any_dtype(strict.dtype):
            out = strict
        else:
            try:
                out = pd.to_datetime(s, format="mixed", errors="coerce")
            except (ValueError, TypeError):
                out = pd.to_datetime(s, format="mixed", errors="coerce", utc=True)
        bad = present & out.isna()
        if bad.any() or not pd.api.types.is_datetime64_any_dtype(out.dtype):
            if not bad.any():
                bad = present
            raise DataFileError(path, f"{int(bad.sum())} unparsable timestamp(s), e.g. {_examples(s[bad])}",
                                f"write timestamps as ISO 8601, e.g. '2024-04-18 00:15:00'", col.name)
        return out
    if col.dtype == "bool":
        if pd.api.types.is_bool_dtype(s.dtype):
            return s.astype("boolean")
        text = s.map(lambda v: str(v).strip().lower() if pd.notna(v) else v)
        present &= text.map(lambda v: v != "" if isinstance(v, str) else True)
        out = pd.Series(pd.NA, index=s.index, dtype="boolean")
        out[present & text.isin(_TRUE)] = True
        out[present & text.isin(_FALSE)] = False
        bad = present & out.isna()
        if bad.any():
            raise DataFileError(path, f"{int(bad.sum())} value(s) that are not true/false, e.g. {_examples(s[bad])}",
                                f"use TRUE/FALSE (or 1/0) in {col.name!r}, or leave it empty when unknown", col.name)
        return out
    # category: keep as text, missing stays missing
    out = s.map(lambda v: (v.strip() or np.nan) if isinstance(v, str) else (np.nan if pd.isna(v) else v))
    return out.astype(object)


def validate_frame(frame: pd.DataFrame, schema: Schema, path) -> pd.DataFrame:
    """Check required columns, coerce documented columns, reject empty/all-missing columns.

    Parameters
    ----------
    frame : pd.DataFrame
        As read by :func:`read_table`.
    schema : Schema
    path : path-like
        For error messages.

    Returns
    -------
    pd.DataFrame
        Documented columns only (schema order), coerced, with a 0..n-1 index.
    """
    if len(frame) == 0:
        raise DataFileError(path, "the file has a header but no data rows", "export the records again, with data rows")
    frame = frame.reset_index(drop=True)
    names = list(frame.columns)
    for c in schema.columns:
        if c.required and c.name not in names:
            near = [n for n in names if n.strip().lower() == c.name.lower()]
            hint = f"rename column {near[0]!r} to {c.name!r}" if near else (
                f"add a column {c.name!r} ({c.dtype}, {c.unit or 'no unit'}: {c.description})")
            raise DataFileError(path, f"missing required column (found: {', '.join(map(repr, names)) or 'none'})", hint, c.name)
    out = {}
    for c in schema.columns:
        if c.name not in names:
            continue
        series = coerce_column(frame, c, path)
        if c.required and series.isna().all():
            raise DataFileError(path, "every value is missing", f"fill in {c.name!r} ({c.description})", c.name)
        out[c.name] = series
    return pd.DataFrame(out, index=frame.index)


def check_time_order(frame: pd.DataFrame, site_column: str, time_column: str, path) -> None:
    """Require strictly increasing timestamps within each site (no duplicates, sorted).

    Raises
    ------
    DataFileError
        Naming the time column, the site and the first offending row.
    """
    t = frame[time_column]
    if t.isna().any():
        rows = t.index[t.isna()]
        raise DataFileError(path, f"{len(rows)} missing timestamp(s), first at row {rows[0] + 1}",
                            "give every record its timestamp (leave the value column empty instead of dropping the time)", time_column)
    for site, idx in frame.groupby(site_column, sort=False, dropna=True).indices.items():
        ts = t.iloc[idx]
        d = np.diff(ts.to_numpy())
        if len(d) == 0:
            continue
        zero = np.flatnonzero(d == np.timedelta64(0))
        neg = np.flatnonzero(d < np.timedelta64(0))
        if len(zero):
            i = zero[0]
            raise DataFileError(path, f"duplicate timestamp {ts.iloc[i + 1]} for {site_column} {str(site)!r} (rows {idx[i] + 1} and {idx[i + 1] + 1})",
                                f"keep one record per {site_column} and timestamp (aggregate or remove duplicates)", time_column)
        if len(neg):
            i = neg[0]
            raise DataFileError(path, f"timestamps not sorted for {site_column} {str(site)!r}: row {idx[i + 1] + 1} ({ts.iloc[i + 1]}) "
                                f"comes after row {idx[i] + 1} ({ts.iloc[i]})",
                                f"sort the file by {site_column!r} then {time_column!r} (ascending)", time_column)


def drop_missing_keys(frame: pd.DataFrame, columns: list[str], path, what: str = "records") -> pd.DataFrame:
    """Drop rows whose key columns (site, target) are missing, with a warning naming the count."""
    miss = frame[columns].isna().any(axis=1)
    if miss.any():
        per = ", ".join(f"{c}: {int(frame[c].isna().sum())}" for c in columns if frame[c].isna().any())
        warn_quality(f"{path}: dropped {int(miss.sum())} of {len(frame)} {what} with a missing value in a key column ({per})", stacklevel=4)
        frame = frame[~miss]
        if len(frame) == 0:
            raise DataFileError(path, "no record left after dropping rows with missing keys",
                                f"fill in {', '.join(map(repr, columns))}", columns[0])
    return frame


def package_version(dist: str) -> str:
    """Installed version of distribution ``dist`` (``"not installed"`` if absent)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def package_file(dist: str, relpath: str) -> Path:
    """Path of a data file inside an installed distribution, without importing the package.

    Parameters
    ----------
    dist : str
        Distribution name (e.g. ``"traffic-anomaly"``).
    relpath : str
        Path relative to site-packages (e.g. ``"traffic_anomaly/data/sample_counts.parquet"``).
    """
    try:
        p = Path(importlib.metadata.distribution(dist).locate_file(relpath))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"bundled data needs the package {dist!r}; install the project with `make install`") from None
    if not p.is_file():
        raise FileNotFoundError(f"bundled data file {relpath!r} not found in package {dist!r} ({p})")
    return p


# --------------------------------------------------------------------------------------
# the adapter base class
# --------------------------------------------------------------------------------------


class DepartmentDataset(abc.ABC):
    """A department's records split per site, FLamby style.

    Parameters
    ----------
    path : str or os.PathLike, optional
        ``None`` loads the bundled real data; otherwise the operator's own CSV or Parquet
        file in the documented :attr:`schema` (validated; :class:`DataFileError` on problems).
    seed : int
        Seed of the random train/test split (classification); kept for forecasting, whose
        split is time ordered.
    test_fraction : float, optional
        Share of each site held out for testing (records for classification, the last part
        of the time range for forecasting). Default: the class's ``default_test_fraction``.
    """

    department: ClassVar[str]
    schema: ClassVar[Schema]
    default_test_fraction: ClassVar[float] = 0.25

    def __init__(self, path: str | os.PathLike | None = None, *, seed: int = 0, test_fraction: float | None = None):
        tf = self.default_test_fraction if test_fraction is None else float(test_fraction)
        if not 0.0 < tf < 1.0:
            raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
        self.path = None if path is None else Path(path)
        self.seed = int(seed)
        self.test_fraction = tf
        if path is None:
            frame = self._bundled_frame()
            self._origin = f"bundled {self.department} data"
        else:
            self._origin = str(self.path)
            frame = self._validate(read_table(self.path), self.path)
        self._frame = frame.reset_index(drop=True)
        self._cache: dict[str, SiteData] = {}
        self._site_keys = self._make_site_keys(self._frame)

    # -- to implement -------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def source(cls) -> dict:
        """Provenance of the bundled data.

        Returns
        -------
        dict
            ``package``, ``version``, ``licence``, ``rows``, ``sites``, ``description``.
        """

    @abc.abstractmethod
    def _bundled_frame(self) -> pd.DataFrame:
        """The bundled records as a validated frame in the documented schema."""

    @abc.abstractmethod
    def _build_site(self, site: str, records: pd.DataFrame) -> SiteData:
        """Turn one site's records into :class:`SiteData`."""

    def _validate(self, frame: pd.DataFrame, path) -> pd.DataFrame:
        """Validate an operator frame (subclasses extend with department rules)."""
        return validate_frame(frame, self.schema, path)

    def _site_name(self, key) -> str:
        """Display name of the site whose site-column value is ``key``."""
        return str(key)

    def _sort_key(self, key):
        return str(key)

    # -- public API -----------------------------------------------------------------------
    def _make_site_keys(self, frame: pd.DataFrame) -> dict[str, Any]:
        keys = frame[self.schema.site_column].dropna().unique().tolist()
        keys.sort(key=self._sort_key)
        return {self._site_name(k): k for k in keys}

    @property
    def sites(self) -> list[str]:
        """Site names, in a stable order."""
        return list(self._site_keys)

    def site_data(self, site: str) -> SiteData:
        """Train/test arrays of one site (computed once, then cached).

        Parameters
        ----------
        site : str
            One of :attr:`sites`.

        Raises
        ------
        ValueError
            For an unknown site (the message lists the valid ones).
        """
        if site not in self._site_keys:
            raise ValueError(f"unknown {self.department} site {site!r}; valid sites: {', '.join(self.sites)}")
        if site not in self._cache:
            key = self._site_keys[site]
            records = self._frame[self._frame[self.schema.site_column] == key]
            self._cache[site] = self._build_site(site, records)
        return self._cache[site]

    def load(self, site: str, train: bool = True) -> TensorDataset:
        """FLamby-like accessor: one site's train (or test) split as a ``TensorDataset``."""
        data = self.site_data(site)
        return (data.train if train else data.test).tensors()

    def raw_frame(self) -> pd.DataFrame:
        """The validated long-format records (one row per record) in the documented schema."""
        return self._frame.copy()

    def export(self, path: str | os.PathLike, sites: list[str] | None = None) -> Path:
        """Write :meth:`raw_frame` as an operator file (``.csv`` or ``.parquet`` by suffix).

        Loading the written file with ``type(self)(path)`` gives identical site arrays.

        Parameters
        ----------
        path : str or os.PathLike
            Where to write; the suffix picks the format.
        sites : list of str, optional
            Only these sites' records (e.g. one hospital's file for its node); default all.

        Returns
        -------
        pathlib.Path
            The written file.

        Raises
        ------
        ValueError
            For an unknown site (the message lists the valid ones).
        """
        p = Path(path)
        suffix = p.suffix.lower()
        frame = self.raw_frame()
        if sites is not None:
            unknown = [s for s in sites if s not in self._site_keys]
            if unknown:
                raise ValueError(f"unknown {self.department} site(s) {', '.join(map(repr, unknown))}; "
                                 f"valid sites: {', '.join(self.sites)}")
            frame = frame[frame[self.schema.site_column].isin([self._site_keys[s] for s in sites])]
        if suffix == ".csv":
            frame.to_csv(p, index=False)
        elif suffix in (".parquet", ".pq"):
            frame.to_parquet(p, index=False)
        else:
            raise DataFileError(p, f"unsupported file type {p.suffix or '(no suffix)'!r}", "export to a .csv or .parquet path")
        return p

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._origin}, {len(self._site_keys)} sites, {len(self._frame)} records)"
