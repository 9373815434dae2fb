"""Common pieces of the department dataset adapters.

Every department (health, traffic, utility) is a :class:`DepartmentDataset`: it reads either
the real records bundled inside an installed package (``path=None``) or an operator's own
CSV/Parquet file in the documented :class:`Schema`, validates it (raising
:class:`DataFileError` with the file, the column and the fix), and turns each site's
records into :class:`SiteData` (train/test :class:`Split` arrays ready for PyTorch).

Nothing is dropped or imputed silently: such steps emit a :class:`DataQualityWarning`
that states the count.

Private records never appear in a message: errors and warnings name the file, the column, the
rows (1-based data rows, the first few then a count) and the kind of problem, never a value
read from a cell. Names that come from the file (site names, header names) are shown cut to
:data:`MAX_SHOWN_NAME` characters with control characters escaped.
"""

from __future__ import annotations

import abc
import csv
import difflib
import importlib.metadata
import os
import re
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
    "MIN_TRAIN_RECORDS",
    "MAX_SITE_NAME",
    "check_site_names",
    "rows_text",
    "shown_name",
]

#: File suffixes accepted for operator files.
SUPPORTED_SUFFIXES = (".csv", ".parquet", ".pq")

#: Fewest training records (forecasting: training windows) a site needs. DP-SGD averages
#: clipped per-record gradients over a Poisson-sampled batch and adds noise of std sigma*C to the
#: sum, so the noise on the mean update is sigma*C/B: below about 16 records it swamps any
#: signal, and the site's test part holds a handful of records at most.
MIN_TRAIN_RECORDS = 16

_DTYPES = ("float", "int", "category", "datetime", "bool")

#: Longest site name (hospital, detector, grid): site names become file and ledger names downstream.
MAX_SITE_NAME = 100
#: Longest name from a file (a site or header name) quoted in a message; longer ones are cut.
MAX_SHOWN_NAME = 60
#: Rows listed in a message before "and N more".
MAX_ROWS_SHOWN = 5


def shown_name(name, limit: int = MAX_SHOWN_NAME) -> str:
    """A name read from a file (site, header) for a message: quoted, control characters escaped, cut to ``limit``.

    Only for names (sites, columns), never for record values.
    """
    text = str(name)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


def rows_text(rows, limit: int = MAX_ROWS_SHOWN) -> str:
    """``"row 17"``, ``"rows 3, 8"`` or ``"rows 1, 2, 3, 4, 5 and 7 more"`` from 0-based data-row labels.

    Messages name rows, never the values in them.
    """
    n = len(rows)
    shown = [str(int(r) + 1) for r in list(rows[:limit])]
    if n == 1:
        return f"row {shown[0]}"
    if n <= limit:
        return f"rows {', '.join(shown[:-1])} and {shown[-1]}"
    return f"rows {', '.join(shown)} and {n - limit} more"


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
    setting : str, optional
        The environment variable that named the file or gave the value (``CITYFED_RANGES``,
        ``CITYFED_DATE_FORMAT``), when it came from one rather than from an argument: a CLI
        then names the variable, not one of its own options.
    """

    def __init__(self, path, problem: str, fix: str, column: str | None = None, *, setting: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        self.column = column
        self.setting = setting
        where = f"{self.path}" + (f", column {shown_name(column)}" if column is not None else "")
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
    plausible : tuple, optional
        Numeric columns: ``(min, max)`` inclusive plausibility range (``None`` = unbounded on
        that side), optionally ``(min, max, "missing")`` to treat out-of-range values as
        missing instead of an error. A department overrides it with a ranges file
        (:mod:`citydata.plausibility`).
    """

    name: str
    dtype: str
    unit: str
    description: str
    required: bool = True
    plausible: tuple | None = None

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
    scale_floor: float = 1e-6  # forecasting: public floor of a window's scale, in target units
    relative_scale_floor: float = 0.01  # forecasting: public floor of a window's scale, share of its lookback mean

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
        from .plausibility import Range

        rows = [("column", "type", "unit", "required", "plausible", "description")]
        for c in self.columns:
            rng = Range(*c.plausible).describe() if c.plausible is not None else "-"
            rows.append((c.name, c.dtype, c.unit or "-", "yes" if c.required else "no", rng, c.description))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for i, r in enumerate(rows):
            lines.append("  ".join(r[k].ljust(widths[k]) for k in range(5)) + "  " + r[5])
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
        with channel 0 the target in window units.
    y : np.ndarray
        float32; classification ``(n,)`` of 0/1; forecasting ``(n, horizon)`` target in window
        units.
    naive : dict of str to np.ndarray, optional
        Forecasting only: ``"persistence"`` and ``"seasonal"`` forecasts ``(n, horizon)`` in
        the same window units, computed only from values before each window's first target step.
    target_time : np.ndarray, optional
        Forecasting only: ``datetime64`` time of each window's first target step.
    loc, scale : np.ndarray, optional
        Forecasting only: float64 ``(n,)``, each window's own lookback mean and floored std
        (:func:`citydata.forecasting.window_normalise`): ``original = value * scale + loc``.
    """

    X: np.ndarray
    y: np.ndarray
    naive: dict[str, np.ndarray] | None = None
    target_time: np.ndarray | None = None
    loc: np.ndarray | None = None
    scale: np.ndarray | None = None

    def __len__(self) -> int:
        return int(len(self.y))

    def to_original(self, values: np.ndarray) -> np.ndarray:
        """Undo the window normalisation, row by row.

        Parameters
        ----------
        values : np.ndarray
            ``(n, ...)`` values in window units, one row per window of this split (``y``, a
            naive forecast, or a model's predictions for ``X``).

        Returns
        -------
        np.ndarray
            float64 ``values * scale + loc`` with each row's own window statistics (the
            values unchanged, as float64, for a split without them: classification).
        """
        v = np.asarray(values, dtype=np.float64)
        if self.loc is None or self.scale is None:
            return v
        if len(v) != len(self.loc):
            raise ValueError(f"{len(v)} rows of values for a split of {len(self.loc)} windows")
        shape = (len(v),) + (1,) * (v.ndim - 1)
        return v * np.reshape(self.scale, shape) + np.reshape(self.loc, shape)

    def tensors(self) -> TensorDataset:
        """The split as a ``TensorDataset`` of ``(X, y)`` float32 tensors."""
        return TensorDataset(torch.from_numpy(np.ascontiguousarray(self.X, dtype=np.float32)),
                             torch.from_numpy(np.ascontiguousarray(self.y, dtype=np.float32)))


@dataclass
class SiteData:
    """One site's train and test splits.

    Attributes
    ----------
    site : str
    train, test : Split
        Forecasting splits carry each window's own scaler (:meth:`Split.to_original`); no
        scaler is fitted on the site as a whole.
    meta : dict
        Extra facts about the site (units, split time, feature scalers, counts).
    """

    site: str
    train: Split
    test: Split
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# reading and validating operator files
# --------------------------------------------------------------------------------------


#: Environment (simulation only): "1" once the simulation's driver has built every site's data and
#: shown its warnings (:func:`simulations.run.show_data_warnings`): the processes that play the nodes
#: (Ray actors inherit the environment) and the ServerApp's central data then do not repeat them.
DATA_WARNINGS_SHOWN_ENV = "CITYFED_DATA_WARNINGS_SHOWN"


def warn_quality(message: str, stacklevel: int | None = None) -> None:
    """Emit a :class:`DataQualityWarning`, attributed to the first caller outside this package.

    ``stacklevel`` is accepted for compatibility and ignored: the call chain inside the
    adapters varies, and the line that opened the data is the useful place to report.
    Nothing is emitted when :data:`DATA_WARNINGS_SHOWN_ENV` is "1" (shown once already).
    """
    import sys

    if os.environ.get(DATA_WARNINGS_SHOWN_ENV) == "1":
        return

    here = os.path.dirname(os.path.abspath(__file__))
    level, frame = 2, sys._getframe(1)  # stacklevel 2 = the caller of warn_quality
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DataQualityWarning, stacklevel=level)


def path_kind(p: Path) -> str | None:
    """What ``p`` is when it is not a readable regular file, in words (``None`` for a regular file).

    Returns
    -------
    str or None
        ``"file not found"``, ``"a directory"``, ``"a character device"``, ``"a block
        device"``, ``"a named pipe (FIFO)"``, ``"a socket"``, ``"a broken symbolic link"`` ...
    """
    import stat

    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if p.is_symlink() else "file not found"
    except OSError as exc:
        return f"cannot be inspected ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _header_names(p: Path, suffix: str) -> list[str]:
    """The column names exactly as the file's header has them (before pandas renames duplicates)."""
    if suffix == ".csv":
        head = pd.read_csv(p, header=None, nrows=1, dtype=str, keep_default_na=False, skipinitialspace=True)
        return [str(v) for v in head.iloc[0].tolist()] if len(head) else []
    import pyarrow.parquet as pq

    return list(pq.read_schema(p).names)


def documented_columns() -> set[str]:
    """Column names documented by any department schema (lower case): the header names a message may quote.

    A header name that is not documented is not quoted: in a file without a header line, the
    "header" is the first record.
    """
    from . import DATASETS

    return {c.name.lower() for cls in DATASETS.values() for c in cls.schema.columns}


def _is_documented(name, documented: set[str]) -> bool:
    return str(name).strip().lower() in documented


def check_duplicate_columns(names: list[str], path) -> None:
    """Refuse a header that names a column twice (after trimming spaces).

    Raises
    ------
    DataFileError
        Naming the duplicated names (documented column names only; others by position) and
        their positions.
    """
    seen: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        seen.setdefault(str(n).strip(), []).append(i + 1)
    dups = {n: pos for n, pos in seen.items() if len(pos) > 1 and not n.startswith("__index_level_")}
    if dups:
        documented = documented_columns()
        parts, named = [], []
        for n, pos in dups.items():
            if _is_documented(n, documented):
                parts.append(f"{shown_name(n)} at columns {', '.join(map(str, pos))}")
                named.append(n)
            else:
                parts.append(f"an undocumented name at columns {', '.join(map(str, pos))} (not shown: in a file "
                             "without a header line it would be a record value)")
        raise DataFileError(path, f"duplicated column name(s): {'; '.join(parts)}",
                            "keep one column per name: remove the copies, or rename them if they hold different data; "
                            "check that the file starts with a header line",
                            named[0] if named else None)


#: Bytes that never occur in a text CSV cell: ASCII control characters other than tab, LF and CR.
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: Every other byte: ``chunk.translate(None, _NOT_CONTROL)`` is empty for a clean chunk (faster than the regex).
_NOT_CONTROL = bytes(b for b in range(256) if not _CONTROL_BYTES.match(bytes([b])))
_SCAN_CHUNK = 1 << 24
#: Longest stretch of a line kept to find the column of a control byte (longer: the column is not named).
_SCAN_LINE = 1 << 20


def check_text_bytes(path, chunk_size: int = _SCAN_CHUNK) -> None:
    """Refuse a CSV holding NUL or other ASCII control bytes (tab, CR and LF are fine).

    pandas' CSV reader cuts a cell at a NUL byte (``2\\x00999`` is read as 2), so such a file
    is refused before it is parsed. The scan reads the file in chunks (a byte translate each; a
    regex search only in a chunk that holds such a byte).

    Raises
    ------
    DataFileError
        A UTF-16 byte order mark, or the first control byte: its line (the header is line 1)
        and, when the line can be split cheaply, its column. The byte and the cell are not
        shown.
    """
    p = Path(path)
    with open(p, "rb") as fh:
        header = fh.readline(_SCAN_LINE)
        if header.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataFileError(p, "the file is UTF-16 text (it starts with a UTF-16 byte order mark), not UTF-8",
                                "save the records as UTF-8 CSV (in a spreadsheet: 'CSV UTF-8'; or "
                                "`iconv -f UTF-16 -t UTF-8 in.csv > out.csv`)")
        fh.seek(0)
        line, quotes, carry = 1, 0, b""  # line of the chunk's start, quote bytes before it, the line's earlier bytes
        while chunk := fh.read(chunk_size):
            m = _CONTROL_BYTES.search(chunk) if chunk.translate(None, _NOT_CONTROL) else None
            if m is None:
                line += chunk.count(b"\n")
                quotes += chunk.count(b'"')
                last = chunk.rfind(b"\n")
                carry = (carry + chunk if last < 0 else chunk[last + 1:])[-_SCAN_LINE:]
                continue
            pos = m.start()
            start = chunk.rfind(b"\n", 0, pos) + 1
            line += chunk.count(b"\n", 0, pos)
            if start:
                quotes += chunk.count(b'"', 0, start)
            else:  # the line began in an earlier chunk: its quotes so far are counted already
                quotes -= carry.count(b'"')
            prefix = (carry if start == 0 else b"") + chunk[start:pos]
            column = None
            if line > 1 and quotes % 2 == 0 and len(prefix) < _SCAN_LINE:  # odd: the line starts inside a quoted cell
                column = _column_at(header, prefix)
            what = "NUL" if chunk[pos] == 0 else "control"
            where = "the header line (line 1)" if line == 1 else f"line {line}"
            raise DataFileError(p, f"{where} contains a NUL/control byte ({what} character): not a text CSV "
                                "(a CSV reader would cut or garble that cell)",
                                "save the records as a UTF-8 text CSV: a NUL byte usually means a binary, UTF-16 or "
                                "damaged file; otherwise remove the control character from that cell", column)


def _column_at(header: bytes, prefix: bytes) -> str | None:
    """The documented header name of the field that ``prefix`` (a line's start) ends in, if any."""
    try:
        names = next(csv.reader([header.decode("utf-8", "replace").lstrip("\ufeff").rstrip("\r\n")]), [])
        fields = next(csv.reader([prefix.decode("utf-8", "replace")]), [])
    except csv.Error:
        return None
    index = len(fields) - 1 if fields else 0  # "a,b," -> ['a', 'b', '']: the byte is in the third field
    if index >= len(names):
        return None
    name = names[index].strip()
    return name if _is_documented(name, documented_columns()) else None


def _parser_problem(exc: Exception) -> str:
    """A CSV parser's message, kept only where it is one of the known forms that hold no cell text."""
    text = str(exc)
    for pattern in (r"Expected \d+ fields in line \d+, saw \d+", r"EOF inside string starting at row \d+",
                    r"EOF following escape character", r"Buffer overflow caught", r"Too many columns specified"):
        m = re.search(pattern, text)
        if m:
            return f"cannot parse the CSV ({m.group(0)})"
    return f"cannot parse the CSV ({type(exc).__name__}; its message is not shown: it may quote a record)"


def read_table(path: str | os.PathLike, text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a CSV or Parquet file, mapping every failure to :class:`DataFileError`.

    Parameters
    ----------
    path : str or os.PathLike
        ``.csv``, ``.parquet`` or ``.pq`` file.
    text_columns : tuple of str, optional
        CSV columns read as text, as written (a site column: ``INF`` stays ``INF``, not the
        float inf); empty cells and pandas' missing-value markers still read as missing. A
        Parquet file keeps the types it was written with.

    Returns
    -------
    pd.DataFrame
        The raw table (no type coercion beyond the reader's own).

    Raises
    ------
    DataFileError
        Not found, a directory/device/pipe, unreadable, unsupported suffix, empty, not
        parsable, or a column name used twice.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    kind = path_kind(p)
    if kind == "file not found":
        raise DataFileError(p, "file not found", "check the path (it is resolved from the current directory "
                            f"{os.getcwd()!r})")
    if kind is not None:
        what = f"is {kind}, not a regular file" if kind.startswith("a ") else kind
        raise DataFileError(p, what, "pass the path of a single CSV or Parquet file"
                            + (" inside that directory" if kind == "a directory" else ""))
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataFileError(p, f"unsupported file type {p.suffix or '(no suffix)'!r}",
                            f"save the records as CSV (.csv) or Parquet (.parquet)")
    if not os.access(p, os.R_OK):
        raise DataFileError(p, "cannot read the file (permission denied)",
                            "make it readable by the user that runs this command (chmod/chown), or copy it somewhere readable")
    if p.stat().st_size == 0:
        raise DataFileError(p, "file is empty (0 bytes)", "export the records again; the file must have a header and data rows")
    if suffix == ".csv":
        check_text_bytes(p)
    try:
        names = _header_names(p, suffix)
        check_duplicate_columns(names, p)
        if suffix == ".csv":
            frame = pd.read_csv(p, float_precision="round_trip", low_memory=False, skipinitialspace=True,
                                dtype={n: str for n in names if n.strip() in text_columns} or None)
            if not isinstance(frame.index, pd.RangeIndex):  # pandas makes the surplus leading fields an index
                raise DataFileError(p, f"some rows have more values than the header has column names ({len(names)})",
                                    "give every row exactly one value per header column (check for stray commas, or "
                                    "quote values that contain commas)")
        else:
            frame = pd.read_parquet(p)
    except DataFileError:
        raise
    except pd.errors.EmptyDataError:
        raise DataFileError(p, "file has no header and no rows", "write a header line with the documented column names") from None
    except UnicodeDecodeError:
        raise DataFileError(p, "cannot parse the CSV: not UTF-8 text (an invalid byte sequence)",
                            "save it as UTF-8 CSV with a comma separator and one header line") from None
    except pd.errors.ParserError as exc:
        raise DataFileError(p, _parser_problem(exc), "save it as UTF-8 CSV with a comma separator and one header line") from None
    except PermissionError:
        raise DataFileError(p, "cannot read the file (permission denied)", "make it readable by the user that runs this command") from None
    except Exception as exc:  # pyarrow raises a variety of errors on corrupt files
        raise DataFileError(p, f"cannot read the file ({type(exc).__name__})",
                            "check that the file is a valid, uncorrupted " + ("CSV" if suffix == ".csv" else "Parquet") + " file") from None
    frame.columns = [str(c).strip() if isinstance(c, str) else str(c) for c in frame.columns]
    check_duplicate_columns(list(frame.columns), p)
    return frame


#: Text that means "missing" in a numeric cell: what pandas' CSV reader turns into NaN, so that a
#: Parquet text column reads like the same CSV. Counted like every missing value.
NA_MARKERS = frozenset({"", "#n/a", "#n/a n/a", "#na", "-1.#ind", "-1.#qnan", "-nan", "1.#ind", "1.#qnan", "<na>", "n/a",
                        "na", "null", "nan", "none", "+nan"})

_TRUE = {"true", "1", "1.0", "yes", "y", "t"}
_FALSE = {"false", "0", "0.0", "no", "n", "f"}


def coerce_column(frame: pd.DataFrame, col: Column, path, date_format: str | None = None) -> pd.Series:
    """Coerce one column to its documented dtype or raise :class:`DataFileError`.

    Parameters
    ----------
    frame : pd.DataFrame
        Table with a positional (0..n-1) index; rows in the error are 1-based data rows.
    col : Column
        Documented column.
    path : path-like
        File name for the error message.
    date_format : str, optional
        Layout of text timestamps (:func:`citydata.timestamps.check_date_format`):
        ``None``/``"ISO"`` year-first only, ``"DMY"``, ``"MDY"`` or a strftime pattern.

    Returns
    -------
    pd.Series
        ``float64`` (float/int), naive ``datetime64[ns]`` (datetime; UTC where the file gave
        UTC offsets), nullable ``boolean`` (bool), or ``object`` strings (category). Missing
        values stay missing.

    Raises
    ------
    DataFileError
        A column whose type is not the documented one (dates/times, durations or true/false
        where a number is expected, a duration or true/false where a timestamp is, ...), named
        with its type and the expected one; or values that cannot be read as the documented
        type (rows named, never the values).
    """
    s = frame[col.name]
    present = s.notna()
    kind = _stored_kind(s)
    if kind is not None and kind[0] not in _ACCEPTED_KINDS[col.dtype] and bool(present.any()):
        raise _wrong_type(path, col, *kind)
    if col.dtype in ("float", "int"):
        out = pd.to_numeric(s, errors="coerce")
        if s.dtype == object:
            # blank strings and NA markers are missing values, not junk (as in pandas' CSV reader)
            blank = s.map(lambda v: isinstance(v, str) and v.strip().lower() in NA_MARKERS)
            present &= ~blank
        out = out.astype("float64")
        bad = present & out.isna()
        if bad.any():
            kind = _stored_kind(s[bad], scan=True)
            if kind is not None and bool(bad.sum() == present.sum()):  # every value: the column's type, not typos
                raise _wrong_type(path, col, *kind)
            raise DataFileError(path, f"{int(bad.sum())} non-numeric value(s) at {rows_text(s.index[bad])}",
                                f"make every value of {col.name!r} a number ({col.unit or 'no unit'}) or leave it empty", col.name)
        inf = np.isinf(out.to_numpy())
        if inf.any():
            raise DataFileError(path, f"{int(inf.sum())} infinite value(s) at {rows_text(s.index[inf])}",
                                f"replace them with finite numbers or leave them empty", col.name)
        if col.dtype == "int":
            frac = out.notna() & (out != np.round(out))
            if frac.any():
                raise DataFileError(path, f"{int(frac.sum())} non-integer value(s) at {rows_text(s.index[frac])}",
                                    f"{col.name!r} holds whole numbers ({col.description})", col.name)
        return out
    if col.dtype == "datetime":
        from .timestamps import _Bad, parse_timestamps

        try:
            return parse_timestamps(s, date_format, warn=lambda m: warn_quality(f"{path}, column {col.name!r}: {m}", stacklevel=6))
        except _Bad as bad:
            raise DataFileError(path, bad.problem, bad.fix, col.name) from None
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
            raise DataFileError(path, f"{int(bad.sum())} value(s) that are not true/false at {rows_text(s.index[bad])}",
                                f"use TRUE/FALSE (or 1/0) in {col.name!r}, or leave it empty when unknown", col.name)
        return out
    # category: keep as text, missing stays missing
    out = s.map(lambda v: (v.strip() or np.nan) if isinstance(v, str) else (np.nan if pd.isna(v) else v))
    return out.astype(object)


#: What a column holds when it is not numbers or text: kind -> words for a message.
_KIND_WORDS = {"datetime": "dates/times", "timedelta": "durations", "bool": "true/false values", "date": "dates",
               "time": "times of day", "bytes": "binary values",
               "nested": "several values per cell (a Parquet list, struct or map column)"}
#: The kinds each documented dtype accepts (the others are refused naming the column's type).
_ACCEPTED_KINDS = {"float": (), "int": (), "datetime": ("datetime",), "bool": ("bool",), "category": ()}
_INFERRED_KIND = {"date": "date", "datetime": "datetime", "datetime64": "datetime", "timedelta": "timedelta",
                  "timedelta64": "timedelta", "time": "time", "bytes": "bytes", "boolean": "bool"}


def _stored_kind(s: pd.Series, scan: bool = False) -> tuple[str, str] | None:
    """``(kind, type name)`` of a column holding dates/times, durations or booleans (its dtype: a Parquet
    column's type, or a CSV column of TRUE/FALSE), or ``("nested", ...)`` for lists/records in a cell (a Parquet
    list, struct or map column); ``None`` for numbers and text.

    ``scan``: also look at the values of a text (object) column (a Parquet date or binary column reads as
    Python objects); slower, so only on an error path. Only type names are returned, never values.
    """
    dt = s.dtype
    if pd.api.types.is_datetime64_any_dtype(dt):
        return "datetime", str(dt)
    if pd.api.types.is_timedelta64_dtype(dt):
        return "timedelta", str(dt)
    if pd.api.types.is_bool_dtype(dt):
        return "bool", str(dt)
    if dt == object:  # a Parquet list/struct/map column reads as arrays/dicts; its type is the same in every row
        first = next((v for v in s if v is not None and not (isinstance(v, float) and v != v)), None)
        if isinstance(first, (list, tuple, dict, set, np.ndarray)):
            return "nested", type(first).__name__
    if scan and dt == object:
        inferred = pd.api.types.infer_dtype(s, skipna=True)
        if inferred in _INFERRED_KIND:
            return _INFERRED_KIND[inferred], inferred
    return None


def _wrong_type(path, col: Column, kind: str, type_name: str) -> DataFileError:
    """The error for a column whose type is not its documented one: what it holds, what is expected, the fix."""
    unit = f" ({col.unit})" if col.unit else ""
    expected, write = {
        "float": (f"a number{unit}", f"numbers{unit}"),
        "int": (f"a whole number{unit}", f"whole numbers{unit}"),
        "datetime": ("a timestamp", "timestamps (a Parquet timestamp column, or ISO 8601 text such as "
                                    "'2024-04-18 00:15:00')"),
        "bool": ("true/false", "true/false (a Parquet boolean column, or TRUE/FALSE or 1/0)"),
        "category": ("text", "text (the column's documented values)"),
    }[col.dtype]
    return DataFileError(path, f"the column holds {_KIND_WORDS[kind]} ({type_name}), expected {expected}",
                         f"store {col.name!r} as {write}: {col.description}; if another column was saved under this "
                         "name, fix the column names (`fl-sim datasets` lists the schema)", col.name)


def validate_frame(frame: pd.DataFrame, schema: Schema, path, *, date_format: str | None = None,
                   ranges: dict | None = None) -> pd.DataFrame:
    """Check required columns, coerce documented columns, reject empty/all-missing columns,
    drop fully duplicated rows (counted warning) and check plausibility ranges.

    Parameters
    ----------
    frame : pd.DataFrame
        As read by :func:`read_table`.
    schema : Schema
    path : path-like
        For error messages.
    date_format : str, optional
        Layout of text timestamps (see :func:`coerce_column`).
    ranges : dict of str to plausibility.Range, optional
        The ranges to check (:func:`citydata.plausibility.resolve_ranges`); default:
        the schema's documented ranges.

    Returns
    -------
    pd.DataFrame
        Documented columns only (schema order), coerced. Its index is the 0-based data row of
        each record in the file (rows dropped as duplicates leave gaps).
    """
    from .plausibility import resolve_ranges

    if len(frame) == 0:
        raise DataFileError(path, "the file has a header but no data rows", "export the records again, with data rows")
    frame = frame.reset_index(drop=True)
    names = list(frame.columns)
    check_duplicate_columns(names, path)
    for c in schema.columns:
        if c.required and c.name not in names:
            near = _near_miss(c.name, names, schema)
            hint = f"rename column {shown_name(near[0])} to {c.name!r}" if near else (
                f"add a column {c.name!r} ({c.dtype}, {c.unit or 'no unit'}: {c.description})")
            raise DataFileError(path, f"missing required column (found: {_found_names(names, schema)})", hint, c.name)
    out = {}
    for c in schema.columns:
        if c.name not in names:
            continue
        series = coerce_column(frame, c, path, date_format)
        if c.required and series.isna().all():
            raise DataFileError(path, "every value is missing", f"fill in {c.name!r} ({c.description})", c.name)
        out[c.name] = series
    out = pd.DataFrame(out, index=frame.index)
    dup = out.duplicated(keep="first").to_numpy()
    if dup.any():
        rows = out.index[dup]
        shown = ", ".join(str(r + 1) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        warn_quality(f"{path}: dropped {int(dup.sum())} of {len(out)} rows that repeat an earlier row exactly "
                     f"(row{'s' if len(rows) > 1 else ''} {shown})", stacklevel=4)
        out = out[~dup]
    ranges = resolve_ranges(schema) if ranges is None else ranges
    for name, rng in ranges.items():
        if name in out:
            out[name] = check_range(out[name], frame[name], schema.column(name), rng, path)
    return out


#: Least similarity (difflib ratio, lower case) of a header name to a missing column for a "rename" hint.
NEAR_MISS_CUTOFF = 0.8


def _near_miss(column: str, names: list, schema: Schema) -> list:
    """Header names that may be ``column`` misspelt: same name in another case or with spaces first, then a close
    spelling (``thalach`` for ``thalch``, ``totl`` for ``total``).

    A close spelling is only offered when the header holds at least one of ``schema``'s column names: otherwise
    the first line may be a record (a file without a header line), whose values are never quoted. Header names
    that are the schema's columns themselves are never offered.
    """
    exact = [n for n in names if str(n).strip().lower() == column.lower()]
    if exact:
        return exact
    known = {c.name.lower() for c in schema.columns}
    lowered = {str(n).strip().lower(): n for n in names if str(n).strip().lower() not in known}
    if not lowered or not any(str(n).strip().lower() in known for n in names):
        return []
    close = difflib.get_close_matches(column.lower(), list(lowered), n=1, cutoff=NEAR_MISS_CUTOFF)
    return [lowered[close[0]]] if close else []


def _found_names(names: list, schema: Schema) -> str:
    """The header names that are documented columns, and a count of the others (not shown: without a header
    line the "names" are the first record's values)."""
    known = {c.name.lower() for c in schema.columns}
    shown = [shown_name(n) for n in names if str(n).strip().lower() in known]
    other = len(names) - len(shown)
    if other:
        shown.append(f"{other} other name(s), not shown: they are not {schema.department} columns; if the file has "
                     "no header line, its first record is read as one")
    return ", ".join(shown) or "none"


def check_range(values: pd.Series, raw: pd.Series, col: Column, rng, path) -> pd.Series:
    """Apply one column's plausibility range.

    Parameters
    ----------
    values : pd.Series
        The coerced column (float64).
    raw : pd.Series
        The column as read (unused: messages name rows, never values; kept for callers).
    col : Column
    rng : citydata.plausibility.Range
    path : path-like

    Returns
    -------
    pd.Series
        ``values`` (action ``"error"``), or with out-of-range values set missing (action
        ``"missing"``, with a counted warning).

    Raises
    ------
    DataFileError
        Action ``"error"`` and a value outside the range: names the column, the range, the
        rows (the first few), the counts below/above and the fix; never the values.
    """
    v = values.to_numpy(dtype=np.float64)
    below = np.zeros(len(v), bool) if rng.min is None else (v < rng.min)
    above = np.zeros(len(v), bool) if rng.max is None else (v > rng.max)
    bad = below | above
    if not bad.any():
        return values
    low = "negative" if rng.min == 0 else f"below {rng.min:g}"
    counts = ", ".join(x for x in (f"{int(below.sum())} {low}" if below.any() else "",
                                   f"{int(above.sum())} above {rng.max:g}" if above.any() else "") if x)
    where = f"outside the plausible range {rng.describe(col.unit)} ({counts})"
    if rng.action == "missing":
        warn_quality(f"{path}, column {col.name!r}: {int(bad.sum())} value(s) {where} treated as missing "
                     "(ranges file: action = \"missing\")", stacklevel=5)
        return values.where(~bad)
    raise DataFileError(path, f"{int(bad.sum())} value(s) {where} at {rows_text(values.index[bad])}",
                        f"correct them, or leave a cell empty when the value is unknown; if such values are real at "
                        f"your site, widen the range of {col.name!r} in a ranges file (--ranges FILE; README: "
                        "plausibility ranges)", col.name)


def check_time_order(frame: pd.DataFrame, site_column: str, time_column: str, path) -> None:
    """Require strictly increasing timestamps within each site (no duplicates, sorted).

    Raises
    ------
    DataFileError
        Naming the time column, the site and the offending rows (not the timestamps).
    """
    t = frame[time_column]
    if t.isna().any():
        rows = t.index[t.isna()]
        raise DataFileError(path, f"{len(rows)} missing timestamp(s) at {rows_text(rows)}",
                            "give every record its timestamp (leave the value column empty instead of dropping the time)", time_column)
    for site, idx in frame.groupby(site_column, sort=False, dropna=True).indices.items():
        ts = t.iloc[idx]
        d = np.diff(ts.to_numpy())
        if len(d) == 0:
            continue
        zero = np.flatnonzero(d == np.timedelta64(0))
        neg = np.flatnonzero(d < np.timedelta64(0))
        row = frame.index.to_numpy()[idx] + 1  # 1-based data rows of the file
        if len(zero):
            i = zero[0]
            raise DataFileError(path, f"duplicate timestamp for {site_column} {shown_name(site)} with different values "
                                f"(rows {row[i]} and {row[i + 1]} have the same time)",
                                f"keep one record per {site_column} and timestamp (aggregate or remove duplicates); if "
                                "these are local times repeated when daylight-saving time ended, write each timestamp "
                                "with its UTC offset (e.g. 2024-10-27 02:15+02:00 and 2024-10-27 02:15+01:00)", time_column)
        if len(neg):
            i = neg[0]
            dst = (" (or, if these are local times that went back when daylight-saving time ended, write each "
                   "timestamp with its UTC offset, e.g. +02:00 before and +01:00 after, and they are converted to UTC)"
                   if -d[i] <= np.timedelta64(1, "h") and 1 <= ts.iloc[i].hour <= 3 else "")  # DST ends 01:00-03:00
            raise DataFileError(path, f"timestamps not sorted for {site_column} {shown_name(site)}: row {row[i + 1]} is earlier "
                                f"than row {row[i]} before it",
                                f"sort the file by {site_column!r} then {time_column!r} (ascending){dst}", time_column)


def _site_name_rule(name: str) -> str | None:
    """What makes ``name`` unusable as a site (file and ledger) name, or ``None``."""
    import unicodedata

    from contract.text import hidden_in_name

    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return "contains a control character (NUL, tab, newline ...)"
    hidden = hidden_in_name(name)  # U+202E shows 'bidi\u202egnp.exe' as 'bidiexe.png'; U+200B: two names look alike
    if hidden is not None:
        return (f"contains the invisible character U+{ord(hidden):04X} (a bidirectional override or mark, a "
                "zero-width, tag or soft-hyphen character, or a line separator)")
    if "/" in name or "\\" in name:
        return "contains a path separator ('/' or '\\')"
    if name in (".", ".."):
        return "is '.' or '..'"
    if len(name) > MAX_SITE_NAME:
        return f"is longer than {MAX_SITE_NAME} characters"
    return None


def check_site_names(frame: pd.DataFrame, site_column: str, path) -> None:
    """Refuse site names (hospital, detector, grid) that cannot safely become file and ledger names.

    A site name may hold spaces and letters of any language; it may not contain ``/``, ``\\``,
    a control character or an invisible one (:func:`contract.text.hidden_in_name`: Unicode format
    characters such as bidirectional overrides, zero-width spaces, soft hyphens and tag
    characters, line and paragraph separators: they make one name display as another), be ``.``
    or ``..``, or be longer than :data:`MAX_SITE_NAME` characters. A zero-width non-joiner or
    joiner (U+200C, U+200D) between two letters or marks is part of the spelling (Persian, Urdu,
    Indic scripts) and is accepted.

    Raises
    ------
    DataFileError
        Naming the site column, the rows, the rule and the fix (the name itself is not shown).
    """
    text = frame[site_column].dropna().map(str)
    bad: dict[str, str] = {}
    for v in pd.unique(text):
        rule = _site_name_rule(v)
        if rule is not None:
            bad[v] = rule
    if not bad:
        return
    rows = text.index[text.isin(list(bad)).to_numpy()]
    rule = bad[text[rows[0]]]
    others = {r for r in bad.values() if r != rule}
    also = f" (other rows: a name that {'; '.join(sorted(others))})" if others else ""
    raise DataFileError(path, f"{len(rows)} record(s) at {rows_text(rows)} have a site name that {rule}{also}",
                        f"site names become file and ledger names: rename the site in {site_column!r} to a name of at "
                        f"most {MAX_SITE_NAME} characters without '/', '\\', control characters or invisible "
                        "characters (bidirectional overrides, zero-width spaces, soft hyphens: delete and retype the name), "
                        "and not '.' or '..' (spaces and letters of any language are fine, and so is a zero-width "
                        "non-joiner or joiner between two letters)", site_column)


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
        Share of each site's records held out for testing (classification). Forecasting adapters
        refuse it: they split at a public test start
        (:class:`citydata.forecasting.ForecastingDataset`). Default: the class's ``default_test_fraction``.
    date_format : str, optional
        Layout of text timestamps: ``"ISO"`` (year first, the default), ``"DMY"`` (day first),
        ``"MDY"`` (month first) or a strftime pattern
        (:func:`citydata.timestamps.check_date_format`). Default: the environment
        variable ``CITYFED_DATE_FORMAT`` if set (``fl-client --date-format`` sets it for the
        node's ClientApp processes), else year-first only.
    ranges : path-like or mapping, optional
        Plausibility-range overrides (a TOML file; :mod:`citydata.plausibility`).
        Default: the file named by ``CITYFED_RANGES`` if set, else the schema's ranges.

    Raises
    ------
    DataFileError
        A bad operator file or ranges file (file, column, rows, fix; never a record's values), or
        a bad ``CITYFED_DATE_FORMAT``/``CITYFED_RANGES`` (naming the variable; ``setting`` set).
    ValueError
        A bad ``test_fraction`` or ``date_format``.
    """

    department: ClassVar[str]
    schema: ClassVar[Schema]
    default_test_fraction: ClassVar[float] = 0.25

    def __init__(self, path: str | os.PathLike | None = None, *, seed: int = 0, test_fraction: float | None = None,
                 date_format: str | None = None, ranges: str | os.PathLike | dict | None = None):
        from .plausibility import resolve_ranges

        tf = self.default_test_fraction if test_fraction is None else float(test_fraction)
        if not 0.0 < tf < 1.0:
            raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
        self.path = None if path is None else Path(path)
        self.seed = int(seed)
        self.test_fraction = tf
        self.date_format = _date_format_setting(date_format)
        self.ranges = resolve_ranges(self.schema, ranges)
        if path is None:
            frame = self._bundled_frame()
            self._origin = f"bundled {self.department} data"
        else:
            self._origin = str(self.path)
            frame = self._guarded(lambda: self._validate(read_table(self.path, (self.schema.site_column,)), self.path),
                                  "reading")
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
        return self._validate_frame(frame, path)

    def _validate_frame(self, frame: pd.DataFrame, path) -> pd.DataFrame:
        """:func:`validate_frame` with this dataset's date format and plausibility ranges."""
        return validate_frame(frame, self.schema, path, date_format=self.date_format, ranges=self.ranges)

    def _guarded(self, step, doing: str):
        """Run ``step()``; an unexpected exception becomes a :class:`DataFileError` without its message.

        The checks above should name every problem precisely; this is the last line that keeps a
        library's traceback (whose message may quote a record) from reaching the operator.
        """
        try:
            return step()
        except (DataFileError, MemoryError, KeyboardInterrupt):
            raise
        except (ValueError, TypeError, ArithmeticError, KeyError, IndexError, AttributeError) as exc:
            raise DataFileError(self._origin, f"unexpected {type(exc).__name__} while {doing} the records (its message is "
                                "not shown: it may quote a record)",
                                "check the file against the schema (`fl-sim datasets`); run again with --debug for the "
                                "traceback and report it: every bad file should get a precise message") from exc

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

    def site_choices(self, site: str) -> str:
        """What a message about an unknown ``site`` may say about the sites there are.

        The bundled (public) data's sites are listed. An operator's own file's are not: its
        site column is read from the records, and with the wrong column mapped as the site
        column the list would be record values. Then only their count, the column and a close
        match to the name asked for (``did you mean``) are given.

        Parameters
        ----------
        site : str
            The name asked for.

        Returns
        -------
        str
            E.g. ``"valid sites: Cleveland, Hungary"`` or ``"its site column 'dataset' holds 4
            distinct value(s), not listed here (...); did you mean 'Cleveland'?"``.
        """
        if self.path is None:
            return f"valid sites: {', '.join(self.sites)}"
        import difflib

        close = difflib.get_close_matches(str(site), self.sites, n=1, cutoff=0.8)
        if not close:
            close = [s for s in self.sites if s.casefold() == str(site).casefold()][:1]
        return (f"its site column {shown_name(self.schema.site_column)} holds {len(self.sites)} distinct value(s), "
                "not listed here (they are read from the records, and a wrong column mapped as the site column "
                "would list record values)" + (f"; did you mean {shown_name(close[0])}?" if close else ""))

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
            raise ValueError(f"unknown {self.department} site {shown_name(site)}; {self.site_choices(site)}")
        if site not in self._cache:
            key = self._site_keys[site]
            records = self._frame[self._frame[self.schema.site_column] == key]
            data = self._guarded(lambda: self._build_site(site, records), f"building site {shown_name(site)} from")
            self._check_site(data)
            self._cache[site] = data
        return self._cache[site]

    def _check_site(self, data: SiteData) -> None:
        """What training needs of a built site: enough records for a split and a batch, finite arrays.

        Raises
        ------
        DataFileError
            Fewer than :data:`MIN_TRAIN_RECORDS` training records (windows) or no test record,
            naming the site; or arrays that are not finite after scaling, naming the target.
        """
        unit = "windows" if self.schema.task == "forecasting" else "records"
        n_train, n_test = len(data.train), len(data.test)
        if n_train < MIN_TRAIN_RECORDS or n_test < 1:
            raise DataFileError(self._origin, f"site {shown_name(data.site)} yields {n_train} training and {n_test} test {unit}; "
                                f"training needs at least {MIN_TRAIN_RECORDS} training {unit} (one DP-SGD batch) and one test "
                                f"{unit[:-1]}", f"provide more records for {shown_name(data.site)}"
                                + (" (a longer period without long gaps)" if unit == "windows" else ""), self.schema.site_column)
        for part in ("train", "test"):
            sp = getattr(data, part)
            arrays = {"X": sp.X, "y": sp.y, **{f"{k} forecast": v for k, v in (sp.naive or {}).items()}}
            for name, a in arrays.items():
                if not np.isfinite(a).all():
                    raise DataFileError(self._origin, f"site {shown_name(data.site)}: the {part} {name} array is not finite after scaling "
                                        "(values too large for float32 arithmetic)",
                                        "check the numeric columns for implausibly large values; keep the plausibility "
                                        "ranges (--ranges) within realistic bounds", self.schema.target)

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
            The written file. It is written beside ``path`` and renamed over it, so a file already
            there is replaced only by a complete one and a failed write leaves nothing behind.

        Raises
        ------
        ValueError
            For an unknown site (the message lists the valid ones).
        OSError
            When the file cannot be written (the earlier file, if any, is left as it was).
        """
        p = Path(path)
        suffix = p.suffix.lower()
        frame = self.raw_frame()
        if sites is not None:
            unknown = [s for s in sites if s not in self._site_keys]
            if unknown:
                raise ValueError(f"unknown {self.department} site(s) {', '.join(map(shown_name, unknown))}; "
                                 f"{self.site_choices(unknown[0])}")
            frame = frame[frame[self.schema.site_column].isin([self._site_keys[s] for s in sites])]
        frame = _whole_number_columns(frame, self.schema)
        if suffix not in (".csv", ".parquet", ".pq"):
            raise DataFileError(p, f"unsupported file type {p.suffix or '(no suffix)'!r}", "export to a .csv or .parquet path")
        # written beside the target, then renamed over it (atomic in one folder): a file already there is
        # replaced only by a complete one, and a failed write leaves nothing behind
        partial = p.with_name(f".{p.stem}.partial-{os.getpid()}{p.suffix}")
        try:
            if suffix == ".csv":
                frame.to_csv(partial, index=False)
            else:
                frame.to_parquet(partial, index=False)
            os.replace(partial, p)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return p

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._origin}, {len(self._site_keys)} sites, {len(self._frame)} records)"


def _date_format_setting(date_format: str | None) -> str | None:
    """``date_format`` checked (:func:`citydata.timestamps.check_date_format`), or, when it is ``None``, the
    value of ``CITYFED_DATE_FORMAT``.

    Raises
    ------
    ValueError
        A bad ``date_format`` argument (the caller names its option).
    DataFileError
        A bad ``CITYFED_DATE_FORMAT`` value: names the variable, its value, the accepted values and
        the fix (unset it, or set an accepted value), with ``setting`` set to the variable.
    """
    from .timestamps import DATE_FORMAT_ENV, DATE_FORMATS, check_date_format

    if date_format is not None:
        return check_date_format(date_format)
    value = os.environ.get(DATE_FORMAT_ENV)
    try:
        return check_date_format(value)
    except ValueError as exc:
        raise DataFileError(f"the environment variable {DATE_FORMAT_ENV}", str(exc),
                            f"unset {DATE_FORMAT_ENV} (then dates must be year first), or set it to one of "
                            f"{', '.join(DATE_FORMATS)} or a strftime pattern with the year, month and day (e.g. "
                            f"{DATE_FORMAT_ENV}='%d.%m.%Y %H:%M'); a --date-format option overrides it",
                            setting=DATE_FORMAT_ENV) from None


def _whole_number_columns(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """``frame`` with each ``int`` column of ``schema`` as nullable whole numbers (pandas ``Int64``).

    pandas holds an integer column with a missing record as float, which a CSV would show as
    ``63.0`` and a Parquet file type as double; written this way the file reads as the schema
    documents it (``63``, an empty cell where the record has none; Parquet ``int64``). A column
    with a fraction in it (not possible after validation) is left as it is.
    """
    out = frame.copy()
    for col in schema.columns:
        if col.dtype != "int" or col.name not in out.columns:
            continue
        whole = whole_numbers(out[col.name])
        if (whole | out[col.name].isna()).all():
            out[col.name] = pd.to_numeric(out[col.name], errors="coerce").round().astype("Int64")
    return out


def whole_numbers(values: pd.Series) -> pd.Series:
    """Which of ``values`` are finite whole numbers that an int64 holds exactly (magnitude <= 2**53).

    Text is read as a number where it is one (``"3"``, ``"3.0"``); ``inf``, ``1e30``, fractions,
    missing values and other text are ``False``. Used where a column's numbers are written or named
    as integers (site names ``detector-3``, exported whole-number columns).
    """
    v = pd.to_numeric(values, errors="coerce")
    return v.notna() & np.isfinite(v) & (v.abs() <= 2**53) & (v == v.round())
