"""Records in a department's schema -> model inputs, scaled as in training (nothing fitted to records).

``fl-serve`` runs on a department node: the schema and the records stay there (scaling uses
no statistic of any record: health fixed public constants, forecasting each window's own lookback).
:class:`SiteFeatures` loads the department's data with the same adapter as training
(:func:`citydata.load_department`: bundled records, or the node's own file), builds
the served site and then turns request records into model inputs (health: fixed public
constants; forecasting: each window normalised by its own lookback):

* validation: the adapter's own ``_validate`` (the same column, type, range, category,
  timestamp and ordering checks as a training file); a violation is the adapter's
  :class:`~citydata.base.DataFileError` naming the column and the fix; health's records are checked
  each on its own (a null value is imputed whatever the other records hold, a repeated record is
  kept: :meth:`SiteFeatures.validate`);
* health: :func:`citydata.health.record_features`, the adapter's own per-record transformation:
  numeric values scaled with the fixed reference constants :data:`citydata.health.REFERENCE`,
  missing values replaced by fixed constants, categories one-hot over the adapter's own lists
  (no statistic of any record); output: the probability of heart disease;
* traffic / utility: the last ``lookback`` steps on the site's grid (utility: hourly means),
  short gaps interpolated by :func:`citydata.forecasting.interpolate_short_gaps`,
  the target normalised by the request window's own lookback mean and floored std
  (:func:`citydata.forecasting.window_normalise`), temperature by the public reference
  (:func:`citydata.forecasting.temperature_channel`), calendar channels from
  :func:`citydata.forecasting.calendar_channels`; output: the next ``horizon`` steps in the
  target's original unit (the model's window units undone with the same window's statistics).

The transformation reproduces the adapter's test arrays exactly
(``tests/test_serve.py`` checks it against ``site_data(site).test.X``), and
:meth:`SiteFeatures.self_check` does so for health at start-up.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import tempfile
import traceback
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from citydata import load_department
from citydata.base import Column, DataFileError, DataQualityWarning, DepartmentDataset, read_table

#: Name used for request data in validation messages.
REQUEST = "request"

#: Column fl-serve adds to a per-record (health) request while checking it: each record's position, so no
#: record is dropped as a repeat of another and each answer stays at its record's place (never listed as found).
ROW = "__fl-serve-row__"


log = logging.getLogger("cityfed.serve")


def _unknown(values: pd.Series) -> pd.Series:
    """Which request values are unknown: null, or a blank string (a CSV's empty cell)."""
    return values.isna() | values.map(lambda v: isinstance(v, str) and not v.strip()).astype(bool)


def error_place(exc: BaseException) -> str:
    """``Type raised at file:line (function)``: what the server log may say of an error (never its message,
    which a library may have filled with a record's value)."""
    frames = traceback.extract_tb(exc.__traceback__)
    place = f" raised at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
    return f"{type(exc).__module__}.{type(exc).__name__}{place}"


#: Fix of a request error the checks did not foresee (an HTTP client cannot pass ``--debug``).
UNFORESEEN_FIX = ("check the records against the department's schema (GET /model -> schema: columns, types, units, "
                  "ranges); if they match it, report this to the node's operator (the server log names the error's "
                  "type and place; fl-serve --debug shows the traceback)")


class RequestError(ValueError):
    """A request that cannot be answered; ``field`` names the column (or ``records``), ``fix`` what to do."""

    def __init__(self, field: str | None, problem: str, fix: str):
        self.field, self.problem, self.fix = field, problem, fix
        super().__init__(f"{field or 'request'}: {problem}. Fix: {fix}")


class SiteError(RequestError):
    """``--site`` is not a site of the department's records (a bad option value: ``fl-serve`` exits 2).

    ``field`` is ``"--site"``; the message names the value, where the sites come from (the bundled
    records or the ``--data`` file) and the sites to choose from.
    """


#: Operator wording of the adapters' fixes (a file's cells and columns, fl-serve's --ranges) and the
#: wording of a JSON request's records and fields: :func:`for_json_records` rewrites one into the other.
_JSON_WORDING = (
    (r"leave a cell empty when the value is unknown", "send null when the value is unknown"),
    (r"; if such values are real at your site, widen the range of ('[^']*') in a ranges file \(--ranges FILE; "
     r"README: plausibility ranges\)", r"; if such values are real at this site, the node's operator can widen the range of "
     r"\1 (fl-serve --ranges)"),
    (r"\bor leave (it|them) empty( when unknown)?", r"or send null\2"),
    (r"^add a column ('[^']*')", r"add the field \1 to every record"),
    (r"^rename column ", "rename the field "),
    (r"\(leave the value column empty instead of dropping the time\)", "(send the value as null instead of dropping the record)"),
)


def for_json_records(exc: "RequestError") -> "RequestError":
    """``exc`` worded for a JSON request (records and fields, null), not for a file (cells, columns, --ranges)."""
    problem = exc.problem.replace("missing required column", "missing required field")
    fix = exc.fix
    for pattern, repl in _JSON_WORDING:
        fix = re.sub(pattern, repl, fix)
    return type(exc)(exc.field, problem, fix)


def _without(problem: str, injected: set[str]) -> str:
    """``problem`` without the columns fl-serve added itself in its ``(found: ...)`` list (the client sent none)."""
    def kept(m: re.Match) -> str:
        items = [x for x in m.group(1).split(", ") if x.strip("'") not in injected]
        return f"(found: {', '.join(items) or 'none'})"

    return re.sub(r"\(found: ([^)]*)\)", kept, problem)


def _shown(value: str, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters (an option value echoed in a message)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...' ({len(value)} characters)"


#: JSON values a record's field may hold (a single value: number, text, true/false or null).
SCALARS = (str, int, float, bool, type(None))


def frame_from_records(records: list[dict]) -> pd.DataFrame:
    """A request's JSON records (one object per record, keys = schema columns) as a frame.

    Every value must be a single JSON value (number, text, true/false or null) that fits a
    float; otherwise :class:`RequestError` names the field (the client's own value is not
    echoed: it may be a private record).
    """
    if not isinstance(records, list) or not records:
        raise RequestError("records", "no records (expected a non-empty list of objects)",
                           "send a non-empty list of records in the department's schema")
    if not all(isinstance(r, dict) for r in records):
        raise RequestError("records", "every record must be a JSON object (column -> value)",
                           "send [{\"column\": value, ...}, ...]")
    empty = [i for i, rec in enumerate(records, start=1) if not rec]
    if empty:  # else pandas makes no rows of them, and the file-loading check said "header but no data rows"
        raise RequestError("records", f"record {empty[0]} is an empty object" + (f" ({len(empty)} are)" if len(empty) > 1
                                                                                   else ""),
                           "give every record its columns in the department's schema (GET /model lists them)")
    for i, rec in enumerate(records, start=1):
        for key, value in rec.items():
            if not isinstance(value, SCALARS):
                what = "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else \
                    type(value).__name__
                raise RequestError(str(key), f"{what} in record {i}; a single value is expected",
                                   f"give {str(key)!r} a single value (a number, text, true/false or null), "
                                   "not a list or an object")
            if isinstance(value, int) and not isinstance(value, bool):
                try:
                    float(value)
                except OverflowError:
                    raise RequestError(str(key), f"number too large in record {i} (over 1.8e308, beyond a float)",
                                       f"send a plausible value of {str(key)!r} (GET /model -> schema gives its unit "
                                       "and range), or null when it is unknown") from None
    try:
        return pd.DataFrame.from_records(records)
    except (OverflowError, TypeError, ValueError) as exc:  # not expected after the checks above
        raise RequestError("records", f"the records cannot be read as a table ({type(exc).__name__})",
                           "send records as flat objects of single values in the department's schema "
                           "(GET /model -> schema)") from None


def frame_from_csv(body: bytes) -> pd.DataFrame:
    """A CSV request body as a frame, read by the adapters' own reader (:func:`read_table`)."""
    with tempfile.TemporaryDirectory(prefix="cityfed-serve-") as tmp:
        path = Path(tmp) / "request.csv"
        path.write_bytes(body)
        try:
            return read_table(path)
        except DataFileError as exc:
            raise RequestError(exc.column or "csv", exc.problem, exc.fix) from None


class SiteFeatures:
    """Model inputs for request records of one site, scaled as in training.

    Parameters
    ----------
    department : str
        ``health``, ``traffic`` or ``utility``.
    site : str
        The site served (a hospital, detector, grid), one of the dataset's sites.
    data : path-like, optional
        The department's own records file (as for ``fl-client --data``); ``None``: bundled data.
    date_format, ranges : optional
        As for :func:`citydata.load_department`.
    test_start : str, optional
        Traffic/utility with ``data``: the node's test start (``fl-client --test-start``); default
        ``CITYFED_TEST_START``. Ignored for health (its split is per record).

    Raises
    ------
    SiteError
        ``site`` is not one of the records' sites (``fl-serve --site``: exit 2).
    citydata.base.DataFileError
        The records file, date format or ranges cannot be used (as for ``fl-client --data``).
    """

    def __init__(self, department: str, site: str, data: str | os.PathLike | None = None, *,
                 date_format: str | None = None, ranges=None, test_start: str | None = None):
        extra = {"test_start": test_start} if test_start is not None and department in ("traffic", "utility") else {}
        self.ds = load_department(department, data, date_format=date_format, ranges=ranges, **extra)
        if site not in self.ds.sites:
            where = "the bundled records" if data is None else f"--data {data}"
            choices = self.ds.site_choices(site)  # the bundled sites, or (an operator's file) a count, no values
            raise SiteError("--site", f"{_shown(site)} is not a {department} site in {where} ({choices})",
                            f"pass --site with one of: {', '.join(self.ds.sites)}" if data is None else
                            f"pass --site as the file's {self.ds.schema.site_column!r} column writes it, or the "
                            "--data file holding this site's records")
        self.department, self.site = department, site
        self.schema = self.ds.schema
        self.site_key = self.ds._site_keys[site]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataQualityWarning)
            self.data = self.ds.site_data(site)  # health: nothing to fit (record_features uses public constants)

    # -- validation (the adapter's own checks) ------------------------------------------------
    def validate(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Check request records with the adapter's training checks; fill what a prediction does not need.

        The site column may be left out (the served site); the target may be left out (it is
        what is predicted: health's ``num``). Raises :class:`RequestError` naming the column.

        Per-record tasks (health) check each record on its own: a null value (unknown) is left to
        the per-record imputation of training whatever the other records hold (a field that is
        null in every record is not refused as a file's empty column would be), a null site is
        the served site, and a record identical to another is kept, so the answer holds one
        value per record, in order (:meth:`_per_record_dataset`).
        """
        s = self.schema
        per_record = self.per_record
        frame = frame.copy()
        frame.columns = [str(c).strip() for c in frame.columns]
        if per_record:
            frame = frame.loc[:, [c != ROW for c in frame.columns]]  # fl-serve's own column; a client's is ignored
        unique = not frame.columns.duplicated().any()  # duplicates: the adapter's check names them
        injected = set()  # what the server adds: a refusal does not list them as the client's
        if s.site_column not in frame.columns:
            frame[s.site_column] = self.site_key
            injected.add(s.site_column)
        elif per_record and unique:  # null or blank: as if left out (a per-record key: the file loader drops the record)
            site = frame[s.site_column]
            frame[s.site_column] = site.where(~_unknown(site), self.site_key)
        if per_record and unique:
            self._refuse_records_without_a_known_value(frame)
        if per_record:
            frame[s.target] = 0  # not used: what the model predicts
            injected.add(s.target)
        for col in s.columns:  # JSON true/false where a number is expected (pandas would read it as 1/0)
            if unique and col.dtype in ("int", "float") and col.name in frame.columns and col.name != s.target:
                flags = frame[col.name].map(lambda v: isinstance(v, (bool, np.bool_))).to_numpy(dtype=bool)
                if flags.any():
                    raise RequestError(col.name, f"true/false in record {int(np.argmax(flags)) + 1}, where a number "
                                       f"({col.unit or 'no unit'}) is expected",
                                       f"send {col.name!r} as a number, or null when it is unknown")
        ds = self.ds
        if per_record:
            frame[ROW] = np.arange(len(frame))
            injected.add(ROW)
            ds = self._per_record_dataset(set(frame.columns))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DataQualityWarning)
                out = ds._guarded(lambda: ds._validate(frame, REQUEST), "checking")
        except DataFileError as exc:
            if exc.__cause__ is not None:  # the adapter's last guard: an error its checks did not name
                log.warning("fl-serve: a request's records raised %s while checking them (answered 422)",
                            error_place(exc.__cause__))
                raise RequestError(exc.column or "records", exc.problem, UNFORESEEN_FIX) from None
            raise RequestError(exc.column or "records", _without(exc.problem, injected), exc.fix) from None
        sites = {self.ds._site_name(k) for k in out[s.site_column].dropna().unique()}
        if sites - {self.site}:
            raise RequestError(s.site_column, f"records of {sorted(sites - {self.site})}; this server serves site {self.site!r}",
                               f"send only records of {self.site!r} (or leave {s.site_column!r} out)")
        if per_record:
            out = self._each_record_kept(out, len(frame))
        if len(out) == 0:
            raise RequestError("records", "no usable record", "send at least one complete record")
        return out

    @property
    def per_record(self) -> bool:
        """Whether each record is answered on its own (health), not the request as one window (forecasting)."""
        return self.schema.task != "forecasting"

    def every_record_fields(self) -> list[str]:
        """The fields every JSON record must carry (null when unknown): per-record tasks' required columns.

        The site (the served site when left out) and the target (what is predicted) are not among
        them; forecasting records (one window) have none.
        """
        s = self.schema
        if not self.per_record:
            return []
        return [c.name for c in s.columns if c.required and c.name not in (s.site_column, s.target)]

    def check_fields(self, records: list[dict]) -> None:
        """Refuse JSON records of which some lack a field other records carry (a per-record task's required field).

        Alone, such a record is refused (missing required field); next to a record that has the
        field it would otherwise be answered as if the field were null. A field no record carries
        is left to the adapter's check (it names near misses).

        Parameters
        ----------
        records : list of dict
            The request's records (checked by :func:`frame_from_records`).

        Raises
        ------
        RequestError
            Naming the field, the first record lacking it and how many do; never a value.
        """
        fields = self.every_record_fields()
        if not fields or len(records) < 2:
            return
        keys = [{str(k).strip() for k in rec} for rec in records]  # as validate() reads the field names
        for name in fields:
            lacking = [i for i, have in enumerate(keys, start=1) if name not in have]
            if lacking and len(lacking) < len(records):
                c = self.schema.column(name)
                more = f" ({len(lacking)} of {len(records)} records lack it)" if len(lacking) > 1 else ""
                raise RequestError(name, f"missing required field in record {lacking[0]}{more}",
                                   f"add the field {name!r} to every record ({c.dtype}, {c.unit or 'no unit'}: "
                                   f"{c.description}); send null when the value is unknown")

    def _per_record_dataset(self, present: set[str]) -> DepartmentDataset:
        """The department's dataset with a schema for one request of per-record answers.

        The adapter's checks are meant for a file: a required column with every value missing
        (an export that lost it) is refused. In a request, a null value is a record's unknown
        value, imputed per record as in training (:func:`citydata.health.record_features`):
        whether it is refused must not depend on the other records. So the required columns the
        request carries are checked as optional ones (every other check unchanged: types, ranges,
        categories; a column the request lacks is still refused), and :data:`ROW` is documented
        so that no record is dropped as a repeat of another. A copy: the served dataset is
        shared by concurrent requests.
        """
        s = self.schema
        columns = tuple(dataclasses.replace(c, required=False) if c.required and c.name in present else c
                        for c in s.columns)
        view = copy.copy(self.ds)
        view.schema = dataclasses.replace(s, columns=columns + (Column(ROW, "int", "", "request record number",
                                                                       required=False),))
        return view

    def _refuse_records_without_a_known_value(self, frame: pd.DataFrame) -> None:
        """Refuse a record whose every field is null or blank: its answer would be the imputation constants' alone.

        Raises
        ------
        RequestError
            Naming the first such record (its position, never a value).
        """
        fields = [c for c in self.every_record_fields() if c in frame.columns]
        if not fields:
            return
        empty = frame[fields].apply(_unknown).all(axis=1).to_numpy()
        if empty.any():
            first = int(np.argmax(empty)) + 1
            more = f" ({int(empty.sum())} records have none)" if empty.sum() > 1 else ""
            raise RequestError("records", f"record {first} has no known value (every field is null){more}",
                               "send at least one known value per record (null only where a value is unknown)")

    @staticmethod
    def _each_record_kept(out: pd.DataFrame, n: int) -> pd.DataFrame:
        """``out`` without :data:`ROW`, after checking that it holds every request record, in order."""
        rows = out[ROW].to_numpy()
        if len(rows) != n or (rows != np.arange(n)).any():  # not expected: the checks above keep every record
            log.warning("fl-serve: checking a request kept %d of its %d records (answered 422)", len(rows), n)
            raise RequestError("records", f"{n - len(rows)} record(s) could not be checked on their own",
                               UNFORESEEN_FIX)
        return out.drop(columns=ROW)

    # -- health -------------------------------------------------------------------------------
    def _health_X(self, r: pd.DataFrame) -> np.ndarray:
        from citydata import health as h

        return h.record_features(r)

    # -- forecasting ----------------------------------------------------------------------------
    def _forecast_X(self, r: pd.DataFrame) -> tuple[np.ndarray, pd.DatetimeIndex, tuple[np.ndarray, np.ndarray]]:
        from citydata.forecasting import (MAX_GAP, calendar_channels, interpolate_short_gaps, temperature_channel,
                                          window_normalise)

        s, meta = self.schema, self.data.meta
        step = pd.Timedelta(s.step)
        target_col = s.target
        frame = r.set_index(s.time_column)
        if self.department == "utility":
            frame = frame[[target_col, "temperature"]].resample(s.step).mean()
        times = pd.DatetimeIndex(frame.index)
        end = times[-1]
        grid = pd.date_range(times[0], end, freq=step)
        if len(grid) < s.lookback:
            raise RequestError(s.time_column, f"the records cover {len(grid)} step(s) of {s.step}; a forecast needs the "
                               f"last {s.lookback} steps ({s.lookback * step} of history)",
                               f"send at least {s.lookback} consecutive {s.step} records of {target_col!r} ending at the "
                               "last known step")
        frame = frame[~frame.index.duplicated()].reindex(grid)
        y, _ = interpolate_short_gaps(frame[target_col].to_numpy(dtype=np.float64))
        y = y[-s.lookback:]
        if not np.isfinite(y).all():
            raise RequestError(target_col, f"{int((~np.isfinite(y)).sum())} of the last {s.lookback} steps have no value "
                               f"(gaps longer than {MAX_GAP} steps are not interpolated)",
                               f"send the last {s.lookback} steps of {target_col!r} with no gap longer than {MAX_GAP} steps")
        win = grid[-s.lookback:]
        loc, scale = window_normalise(y[None, :], s.scale_floor, s.relative_scale_floor)
        channels = [((y[None, :] - loc[:, None]) / scale[:, None]).astype(np.float32)[0][:, None], calendar_channels(win)]
        if meta.get("temperature_reference") is not None:
            temp = frame["temperature"].to_numpy(dtype=np.float64)[-s.lookback:] if "temperature" in frame \
                else np.full(s.lookback, np.nan)
            t_scaled, avail = temperature_channel(temp)
            channels += [t_scaled[:, None], avail[:, None]]
        X = np.concatenate(channels, axis=1).astype(np.float32)[None]
        future = pd.date_range(end + step, periods=s.horizon, freq=step)
        return X, future, (loc, scale)

    # -- public -----------------------------------------------------------------------------------
    def inputs(self, frame: pd.DataFrame) -> tuple[np.ndarray, dict]:
        """Validated model inputs for request records, with what the answer needs.

        Returns
        -------
        X : np.ndarray
            Health: ``(n, n_features)``; forecasting: ``(1, lookback, channels)``.
        info : dict
            Forecasting: ``times`` of the predicted steps and ``window`` (the request window's
            own ``loc`` and ``scale``, which :meth:`answer` uses to undo the normalisation).
        """
        r = self.validate(frame)
        if self.schema.task == "forecasting":
            X, future, window = self._forecast_X(r)
            return X, {"times": future, "window": window}
        return self._health_X(r), {}

    def answer(self, outputs: np.ndarray, info: dict) -> dict:
        """Model outputs in the department's original units (probabilities, or forecasts with their times)."""
        s = self.schema
        if s.task == "forecasting":
            loc, scale = info["window"]  # the request window's own statistics (one window)
            values = np.asarray(outputs, dtype=np.float64).reshape(-1) * float(scale[0]) + float(loc[0])
            return {"forecast": [{s.time_column: t.isoformat(), s.target: float(v)} for t, v in zip(info["times"], values)],
                    "unit": self.data.meta.get("unit") or s.target_unit, "site": self.site}
        p = 1.0 / (1.0 + np.exp(-outputs.reshape(-1).astype(np.float64)))
        return {"probability": [float(x) for x in p], "meaning": "probability of heart disease (num > 0)",
                "site": self.site}

    def test_records(self) -> pd.DataFrame:
        """Health: the served site's test records (adapter order), for the start-up self-check and tests."""
        frame = self.ds._frame
        return frame.loc[self.data.meta["test_rows"]].reset_index(drop=True)

    def self_check(self) -> float:
        """Health: largest difference between this transformation and the adapter's test arrays (0 when identical).

        Raises
        ------
        RuntimeError
            When they differ by more than 1e-5 (the served scaling would not be the training one).
        """
        if self.schema.task == "forecasting":
            return 0.0
        X = self._health_X(self.validate(self.test_records()))
        diff = float(np.abs(X - self.data.test.X).max()) if len(X) else 0.0
        if X.shape != self.data.test.X.shape or diff > 1e-5:
            raise RuntimeError(f"serving features of site {self.site!r} differ from training's (max {diff:g}); "
                               "report this: the served scaling must be the training one")
        return diff
