"""Reading the time column of a department file: layouts, day/month order, UTC offsets.

Rules (README, "Your own records"):

* Without a date format, timestamps must be year-first, ISO 8601 style:
  ``2024-04-18 00:15:00``, ``2024-04-18T00:15``, ``2024/04/18 00:15:00.250``; seconds and
  fractions are optional, the date alone means midnight.
* ``01/04/2024`` could be the 1st of April or the 4th of January: such day/month-first values
  are an error until the file's order is given, ``date_format="DMY"`` (day first) or ``"MDY"``
  (month first) (``--date-format`` on the command line). A value that does not fit the given
  order (a month above 12) is an error naming the column, not silently swapped. Any other
  layout can be given as a ``strftime`` pattern, e.g. ``"%d.%m.%Y %H:%M"``.
* A timestamp may carry a UTC offset (``+02:00``, ``+0200``, ``+02``, ``Z``, ``UTC``).
  Offset-aware timestamps, and tz-aware Parquet columns, are converted to UTC and stored
  without a time zone. If they carry several offsets (daylight-saving time) a counted
  :class:`~citydata.base.DataQualityWarning` says so. A column mixing timestamps with
  and without an offset is an error: the naive ones cannot be placed in time.
* Naive timestamps are taken as they are (the site's local time, as the bundled data).
* Years outside 1900-2100 are an error (a typo in the year, or a wrong date format).

Messages name the rows of the offending timestamps (the first few, then a count), never the
timestamps themselves: they are part of the records.
"""

from __future__ import annotations

import datetime as _dt
import re

import numpy as np
import pandas as pd

__all__ = ["DATE_FORMATS", "DATE_FORMAT_ENV", "YEAR_RANGE", "check_date_format", "parse_timestamps"]

#: Named date orders accepted by ``date_format`` / ``--date-format`` (or a strftime pattern with ``%``).
DATE_FORMATS = {
    "ISO": "year first, ISO 8601: 2024-04-18 00:15:00 (the default)",
    "YMD": "year first: 2024-04-18, 2024/04/18 (same as ISO)",
    "DMY": "day first: 18/04/2024 00:15, 18.04.2024, 18-04-2024",
    "MDY": "month first: 04/18/2024 00:15",
}
#: Environment variable read when no date format is passed (``fl-client --date-format`` sets it
#: for the node's ClientApp processes, which open the file themselves).
DATE_FORMAT_ENV = "CITYFED_DATE_FORMAT"
#: The fix of a refused date format, worded once (fl-client's and fl-serve's --date-format).
DATE_FORMAT_FIX = ("fix: pass ISO (year first, the default), DMY (day first: 18/04/2024), MDY (month first: "
                   "04/18/2024) or a strftime pattern with the year, month and day such as '%d.%m.%Y %H:%M', or leave "
                   "--date-format out for year-first dates")
#: Plausible years of a record.
YEAR_RANGE = (1900, 2100)

_TIME = (r"(?:(?:[Tt]|\s+)(?P<H>\d{1,2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:[.,](?P<F>\d{1,9}))?)?"
         r"\s*(?P<tz>[Zz]|UTC|GMT|[+-]\d{2}(?::?\d{2})?)?)?")
_NUMERIC = re.compile(r"^\s*(?P<a>\d{1,4})(?P<sep>[-/.])(?P<b>\d{1,2})(?P=sep)(?P<c>\d{1,4})" + _TIME + r"\s*$")

_EXAMPLE = "'2024-04-18 00:15:00'"


class _Bad(Exception):
    """Internal: (problem, fix) of a time column, turned into a DataFileError by the caller."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def check_date_format(value: str | None) -> str | None:
    """Normalise a ``date_format`` value.

    Parameters
    ----------
    value : str or None
        ``None``/``""`` (year-first only), ``"ISO"``, ``"YMD"``, ``"DMY"``, ``"MDY"`` (any
        case), or a ``strftime`` pattern containing ``%`` (e.g. ``"%d.%m.%Y %H:%M"``).

    Returns
    -------
    str or None
        The upper-case name, the pattern unchanged, or ``None``.

    Raises
    ------
    ValueError
        For anything else; the message lists the accepted values.
    """
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    if text.upper() in DATE_FORMATS:
        return text.upper()
    if "%" in text:
        try:
            _dt.datetime(2024, 4, 18, 0, 15).strftime(text)
        except ValueError as exc:
            raise ValueError(f"date format {text!r} is not a valid strftime pattern ({exc})") from None
        missing = [name for name, codes in (("year", "%Y %y"), ("month", "%m %b %B %j"), ("day", "%d %j")) if
                   not any(c in text for c in codes.split())]
        if missing:
            raise ValueError(f"date format {text!r} has no {' and no '.join(missing)} (e.g. %Y, %m, %d): every "
                             "timestamp would get a default one")
        return text
    choices = "; ".join(f"{k} = {v}" for k, v in DATE_FORMATS.items())
    raise ValueError(f"unknown date format {text!r}; use one of: {choices}; or a strftime pattern such as '%d.%m.%Y %H:%M'")


def _one(values: pd.Series, mask: np.ndarray) -> str:
    """The rows of the offending values (``"row 17"``, ``"rows 3, 5 and 2 more"``; 1-based data rows), not the values."""
    from .base import rows_text

    return rows_text(values.index[np.flatnonzero(mask)])


def _offset_text(minutes: int) -> str:
    sign = "+" if minutes >= 0 else "-"
    m = abs(int(minutes))
    return f"{sign}{m // 60:02d}:{m % 60:02d}"


def _offsets_summary(minutes: np.ndarray) -> str:
    vals, counts = np.unique(minutes, return_counts=True)
    order = np.argsort(-counts)
    parts = [f"{_offset_text(vals[i])} on {counts[i]} row(s)" for i in order[:4]]
    return ", ".join(parts) + (f" and {len(vals) - 4} more offsets" if len(vals) > 4 else "")


def _check_years(out: pd.Series, text: pd.Series) -> None:
    ok = out.notna()
    years = out.dt.year.where(ok)
    bad = (ok & ((years < YEAR_RANGE[0]) | (years > YEAR_RANGE[1]))).to_numpy()
    if bad.any():
        raise _Bad(f"{int(bad.sum())} timestamp(s) outside the years {YEAR_RANGE[0]}-{YEAR_RANGE[1]} at {_one(text, bad)}",
                   "correct the year (a typo, or a day/month/year order the file does not use: see --date-format)")


def _from_datetime_dtype(s: pd.Series, warn) -> pd.Series:
    """A datetime64 column (Parquet): tz-aware -> UTC, naive; any unit -> ns."""
    tz = getattr(s.dtype, "tz", None)
    if tz is not None:
        present = s.notna().to_numpy()
        utc = s.dt.tz_convert("UTC").dt.tz_localize(None)
        local = s.dt.tz_localize(None)
        offsets = ((local - utc).dt.total_seconds() // 60).to_numpy()[present].astype(np.int64)
        if len(np.unique(offsets)) > 1:
            warn(f"time zone {tz}: {len(offsets)} timestamp(s) with {len(np.unique(offsets))} different UTC offsets "
                 f"({_offsets_summary(offsets)}); all converted to UTC (daylight-saving time changes the offset)")
        s = utc
    years = s.dt.year
    bad = (s.notna() & ((years < YEAR_RANGE[0]) | (years > YEAR_RANGE[1]))).to_numpy()
    if bad.any():
        raise _Bad(f"{int(bad.sum())} timestamp(s) outside the years {YEAR_RANGE[0]}-{YEAR_RANGE[1]} at {_one(s, bad)}",
                   "correct the year")
    return s.astype("datetime64[ns]")


def _as_text(s: pd.Series) -> pd.Series:
    """Object column -> stripped strings (NaN stays NaN); datetime objects -> ISO text."""
    number = object()

    def conv(v):
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NaT:
            return np.nan
        if isinstance(v, str):
            t = v.strip()
            return t if t else np.nan
        if isinstance(v, (_dt.datetime, _dt.date, pd.Timestamp)):
            return v.isoformat()
        if isinstance(v, (bool, int, float, np.integer, np.floating, np.bool_)):
            return number
        return str(v).strip() or np.nan
    out = s.map(conv)
    numbers = out.map(lambda v: v is number).to_numpy(dtype=bool)
    if numbers.any():
        raise _Bad(f"{int(numbers.sum())} timestamp(s) are numbers ({_one(s, numbers)}), not dates",
                   f"write timestamps as ISO 8601 text, e.g. {_EXAMPLE}")
    return out


def _strptime(text: pd.Series, fmt: str) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """Parse with an explicit strftime pattern: (naive wall time, aware mask, offset minutes)."""
    values, aware, offset = {}, {}, {}
    for v in pd.unique(text.dropna()):
        try:
            d = _dt.datetime.strptime(v, fmt)
        except ValueError:
            values[v] = None
            continue
        off = d.utcoffset()
        aware[v] = off is not None
        offset[v] = 0 if off is None else int(off.total_seconds() // 60)
        values[v] = d.replace(tzinfo=None)
    parsed = text.map(lambda v: values.get(v) if isinstance(v, str) else None)
    bad = (text.notna() & parsed.isna()).to_numpy()
    if bad.any():
        raise _Bad(f"{int(bad.sum())} timestamp(s) that do not match --date-format {fmt!r} at {_one(text, bad)}",
                   f"write every timestamp as {_dt.datetime(2024, 4, 18, 0, 15).strftime(fmt)!r} (the pattern {fmt!r}), "
                   "or pass the pattern the file uses")
    wall = pd.to_datetime(parsed, errors="coerce")
    aw = text.map(lambda v: aware.get(v, False) if isinstance(v, str) else False).to_numpy(dtype=bool)
    om = text.map(lambda v: offset.get(v, 0) if isinstance(v, str) else 0).to_numpy(dtype=np.int64)
    return wall, aw, om


def _regex(text: pd.Series, date_format: str | None) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """Parse the numeric layouts: (naive wall time, aware mask, offset minutes)."""
    present = text.notna().to_numpy()
    m = text.astype(object).where(text.notna(), "").astype(str).str.extract(_NUMERIC)
    matched = m["a"].notna().to_numpy() & present
    unmatched = present & ~matched
    if unmatched.any():
        how = (f"write them as {DATE_FORMATS[date_format]}" if date_format in DATE_FORMATS
               else f"write timestamps as ISO 8601, e.g. {_EXAMPLE} (an offset such as +02:00 or Z is allowed), or pass "
                    "--date-format with the file's layout (DMY, MDY, or a strftime pattern such as '%d.%m.%Y %H:%M')")
        raise _Bad(f"{int(unmatched.sum())} unparsable timestamp(s) at {_one(text, unmatched)}", how)
    a, b, c = (m[k].fillna("0") for k in ("a", "b", "c"))
    year_first = (a.str.len() == 4).to_numpy()
    other = present & ~year_first
    if other.any():
        two_digit_year = other & (c.str.len() != 4).to_numpy()
        if two_digit_year.any():
            raise _Bad(f"{int(two_digit_year.sum())} timestamp(s) without a 4-digit year at {_one(text, two_digit_year)}",
                       "write the year with 4 digits (2024, not 24)")
        if date_format not in ("DMY", "MDY"):
            a_num = a.astype(int).to_numpy()
            b_num = b.astype(int).to_numpy()
            hint = ""
            if (other & (a_num > 12)).any():
                hint = f"; {_one(text, other & (a_num > 12))} can only be day-first (a first number above 12)"
            elif (other & (b_num > 12)).any():
                hint = f"; {_one(text, other & (b_num > 12))} can only be month-first (a second number above 12)"
            given = f" with --date-format {date_format}" if date_format else " and no date format was given"
            raise _Bad(f"{int(other.sum())} timestamp(s) are not year-first{given} ({_one(text, other)}): "
                       f"day and month cannot be told apart{hint}",
                       "pass --date-format DMY (day/month/year) or --date-format MDY (month/day/year), "
                       f"or write ISO 8601 dates ({_EXAMPLE})")
    ymd = year_first | ~present
    year = np.where(ymd, a, c).astype(int)
    if date_format == "MDY":  # month/day/year
        month, day = np.where(ymd, b, a).astype(int), np.where(ymd, c, b).astype(int)
    else:  # year/month/day, or day/month/year (DMY): the month is the middle field
        month, day = b.to_numpy().astype(int), np.where(ymd, c, a).astype(int)
    bad_year_pos = present & year_first & (c.str.len() > 2).to_numpy()
    if bad_year_pos.any():
        raise _Bad(f"{int(bad_year_pos.sum())} unparsable timestamp(s) at {_one(text, bad_year_pos)}",
                   f"write timestamps as ISO 8601, e.g. {_EXAMPLE}")
    bad_month = present & ((month < 1) | (month > 12))
    if bad_month.any():
        if date_format in ("DMY", "MDY") and (bad_month & ~year_first).any():
            other_fmt = "DMY" if date_format == "MDY" else "MDY"
            order = "month-first" if date_format == "MDY" else "day-first"
            raise _Bad(f"{int(bad_month.sum())} timestamp(s) with a month above 12 when read {order} (--date-format "
                       f"{date_format}) at {_one(text, bad_month)}",
                       f"if the file is {'day' if other_fmt == 'DMY' else 'month'}-first pass --date-format {other_fmt}; "
                       "otherwise correct those dates")
        raise _Bad(f"{int(bad_month.sum())} timestamp(s) with an impossible month at {_one(text, bad_month)}",
                   "correct the month (1-12)")
    hh = m["H"].fillna("0").astype(int).to_numpy()
    mm = m["M"].fillna("0").astype(int).to_numpy()
    ss = m["S"].fillna("0").astype(int).to_numpy()
    bad_time = present & ((hh > 23) | (mm > 59) | (ss > 59))
    if bad_time.any():
        raise _Bad(f"{int(bad_time.sum())} timestamp(s) with an impossible time of day at {_one(text, bad_time)}",
                   "write times as HH:MM[:SS] with hours 0-23 (midnight is 00:00 of the next day, not 24:00)")
    parts = pd.DataFrame({"year": np.where(present, year, 2000), "month": np.where(present, month, 1),
                          "day": np.where(present, day, 1), "hour": hh, "minute": mm, "second": ss})
    bad_year = present & ((year < YEAR_RANGE[0]) | (year > YEAR_RANGE[1]))
    if bad_year.any():
        raise _Bad(f"{int(bad_year.sum())} timestamp(s) outside the years {YEAR_RANGE[0]}-{YEAR_RANGE[1]} at {_one(text, bad_year)}",
                   "correct the year (a typo, or a day/month/year order the file does not use: see --date-format)")
    wall = pd.to_datetime(parts, errors="coerce")
    bad_day = present & wall.isna().to_numpy()
    if bad_day.any():
        raise _Bad(f"{int(bad_day.sum())} timestamp(s) with an impossible day of the month (a date that does not exist) at {_one(text, bad_day)}",
                   "correct those dates" + ("" if date_format in ("DMY", "MDY") else
                                            " (or, if the file is not year-first, pass --date-format DMY or MDY)"))
    frac = m["F"].fillna("").str.ljust(9, "0").str.slice(0, 9).replace("", "0").astype(np.int64).to_numpy()
    wall = pd.Series((wall + pd.to_timedelta(frac, unit="ns")).to_numpy(), index=text.index).where(present)
    tz = m["tz"]
    aware = (present & tz.notna().to_numpy())
    om = np.zeros(len(text), dtype=np.int64)
    if aware.any():
        t = tz.fillna("").str.upper().str.replace(":", "", regex=False)
        minutes = {}
        for v in pd.unique(t[aware]):
            if v in ("Z", "UTC", "GMT"):
                minutes[v] = 0
                continue
            h, mi = int(v[1:3]), (int(v[3:5]) if len(v) > 3 else 0)
            if h > 14 or mi > 59:
                bad_offset = aware & (t == v).to_numpy()
                raise _Bad(f"{int(bad_offset.sum())} timestamp(s) with an impossible UTC offset at {_one(text, bad_offset)}",
                           "UTC offsets lie between -12:00 and +14:00")
            minutes[v] = (-1 if v[0] == "-" else 1) * (h * 60 + mi)
        om[aware] = t[aware].map(minutes).to_numpy(dtype=np.int64)
    return wall, aware, om


def parse_timestamps(s: pd.Series, date_format: str | None = None, warn=None) -> pd.Series:
    """Parse a time column into naive ``datetime64[ns]`` (UTC where the file gave offsets).

    Parameters
    ----------
    s : pd.Series
        The raw column (strings from CSV; strings or ``datetime64`` from Parquet), with a
        0..n-1 index (rows in messages are 1-based data rows).
    date_format : str, optional
        See :func:`check_date_format`.
    warn : callable, optional
        ``warn(message)`` for counted data-quality warnings (several UTC offsets).

    Returns
    -------
    pd.Series
        ``datetime64[ns]``; missing values are ``NaT``.

    Raises
    ------
    _Bad
        ``(problem, fix)``, turned into a :class:`~citydata.base.DataFileError` naming
        the column by :func:`citydata.base.coerce_column`.
    """
    warn = warn or (lambda msg: None)
    date_format = check_date_format(date_format)
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        return _from_datetime_dtype(s, warn)
    if pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype):
        present = s.notna()
        if not present.any():
            return pd.Series(pd.NaT, index=s.index, dtype="datetime64[ns]")
        raise _Bad(f"timestamps are numbers ({_one(s, present.to_numpy())}), not dates",
                   f"write timestamps as ISO 8601 text, e.g. {_EXAMPLE}")
    text = _as_text(s)
    present = text.notna().to_numpy()
    if not present.any():
        return pd.Series(pd.NaT, index=s.index, dtype="datetime64[ns]")
    if date_format is not None and "%" in date_format:
        wall, aware, om = _strptime(text, date_format)
    else:
        wall, aware, om = _regex(text, date_format)
    naive = present & ~aware
    if aware.any() and naive.any():
        raise _Bad(f"{int(aware.sum())} timestamp(s) carry a UTC offset ({_one(text, aware)}) and {int(naive.sum())} "
                   f"do not ({_one(text, naive)}); the ones without cannot be placed in time",
                   "give every timestamp the same kind: all with their UTC offset (e.g. +02:00 or Z), or none (local time)")
    out = pd.Series(wall, index=s.index).astype("datetime64[ns]")
    if aware.any():
        offs = om[aware]
        if len(np.unique(offs)) > 1:
            warn(f"{int(aware.sum())} timestamp(s) with {len(np.unique(offs))} different UTC offsets "
                 f"({_offsets_summary(offs)}); all converted to UTC (daylight-saving time changes the offset)")
        out = out - pd.to_timedelta(om, unit="m")
    _check_years(out, text)
    return out
