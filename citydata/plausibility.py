"""Plausibility ranges of numeric columns, and a department's own overrides (``--ranges FILE``).

Every numeric column with a documented range (``Column.plausible``; README, "Schema and
plausibility ranges") is checked after it is read: a value outside the range is an error naming
the file, the column, the range and the rows (never the value: it is part of a record), because a value that cannot be real (an age of
1e9 years, a negative blood pressure) is a data-entry or unit error that would otherwise turn
into a silently wrong model. A department whose real records do fall outside a default (a
grid whose net demand can be negative) overrides it in a small TOML file::

    # ranges.toml: replaces the default range of each column listed here
    [demand]
    min = -500.0            # omitted bounds keep the default
    max = 5000.0

    [trestbps]
    action = "missing"      # out-of-range values are treated as missing (imputed/interpolated,
                            # with a counted DataQualityWarning) instead of stopping with an error

``fl-client --ranges FILE`` and ``fl-sim baselines --ranges FILE`` read it, as does the
``ranges`` argument of :func:`citydata.load_department`. ``fl-client`` passes it to the
node's ClientApp processes through :data:`RANGES_ENV`.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.text_files import BOM_FIX, UTF8_BOM, load_toml

__all__ = ["ACTIONS", "RANGES_ENV", "Range", "load_ranges", "resolve_ranges"]

#: What happens to an out-of-range value: ``"error"`` stops with a DataFileError,
#: ``"missing"`` treats it as a missing value (counted DataQualityWarning).
ACTIONS = ("error", "missing")
#: Environment variable naming a ranges TOML file, read when no ``ranges`` argument is given.
RANGES_ENV = "CITYFED_RANGES"
#: Largest magnitude a range bound may have: beyond it values cannot be scaled in float32.
MAX_BOUND = 1e15


@dataclass(frozen=True)
class Range:
    """Plausible values of one numeric column.

    Attributes
    ----------
    min, max : float or None
        Inclusive bounds (``None``: unbounded on that side).
    action : str
        ``"error"`` or ``"missing"`` (see :data:`ACTIONS`).
    """

    min: float | None
    max: float | None
    action: str = "error"

    def describe(self, unit: str = "") -> str:
        """``"0 to 120 years"``-style text."""
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "inf" if self.max is None else f"{self.max:g}"
        return f"{lo} to {hi}" + (f" {unit}" if unit else "")


def _bad(source, problem: str, fix: str, column: str | None = None):
    from .base import DataFileError

    return DataFileError(source, problem, fix, column)


def _bound(source, col: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(source, f"[{col}] {key} = {value!r} is not a number",
                   f"write the bound as a number (unquoted), or remove '{key}' to keep the default bound", col)
    v = float(value)
    if not math.isfinite(v) or abs(v) > MAX_BOUND:
        raise _bad(source, f"[{col}] {key} = {value!r} is not a finite number of magnitude <= {MAX_BOUND:g}",
                   f"write a finite bound within +-{MAX_BOUND:g} (values beyond it cannot be scaled for training), or "
                   f"remove '{key}' to keep the default bound", col)
    return v


def resolve_ranges(schema, overrides: str | os.PathLike | Mapping | None = None) -> dict[str, Range]:
    """The ranges that apply to ``schema``'s columns: the documented defaults, then ``overrides``.

    Parameters
    ----------
    schema : citydata.base.Schema
    overrides : path-like or mapping, optional
        A ranges TOML file (see the module docstring) or the same content as a mapping
        ``{column: {"min": .., "max": .., "action": ..}}``; ``None``: the file named by
        :data:`RANGES_ENV` if set, else none.

    Returns
    -------
    dict of str to Range
        One entry per column that has a range.

    Raises
    ------
    DataFileError
        For a bad overrides file (unreadable, not TOML, an unknown or non-numeric column, an
        unknown key, a bound that is not a finite number, ``min > max``, an unknown action),
        naming the file, the column and the fix. A file named by :data:`RANGES_ENV` is named
        with the variable (and ``setting`` is set to it).
    """
    if overrides is not None:
        return _resolve(schema, overrides)
    env = os.environ.get(RANGES_ENV, "").strip()
    try:
        return _resolve(schema, env or None)
    except Exception as exc:
        from .base import DataFileError

        if not isinstance(exc, DataFileError):
            raise
        raise DataFileError(f"{exc.path} (the ranges file named by the environment variable {RANGES_ENV})",
                            exc.problem, f"{exc.fix}; or unset {RANGES_ENV} to keep the schema's ranges", exc.column,
                            setting=RANGES_ENV) from None


def _resolve(schema, overrides) -> dict[str, Range]:
    """:func:`resolve_ranges` with ``overrides`` given (``None``: the schema's ranges only)."""
    out = {c.name: Range(*c.plausible) for c in schema.columns if c.plausible is not None}
    if overrides is None:
        return out
    source, table = load_ranges(overrides) if not isinstance(overrides, Mapping) else ("ranges", dict(overrides))
    # the numeric columns that have a plausibility range (a label such as health's num is checked by
    # its department's own rule, an id by none: a range for them would be silently ignored)
    numeric = {c.name: c for c in schema.columns if c.dtype in ("float", "int") and c.plausible is not None}
    names = [c.name for c in schema.columns]
    for col, spec in table.items():
        if col not in names:
            close = difflib.get_close_matches(str(col), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _bad(source, f"[{col}] is not a {schema.department} column{hint}",
                       f"use one of the numeric columns: {', '.join(numeric)}", str(col))
        if col not in numeric and schema.column(col).dtype in ("float", "int"):
            raise _bad(source, f"[{col}] has no plausibility range to change (its values are checked by the "
                       f"{schema.department} loader's own rule, which a ranges file does not override)",
                       f"remove [{col}]; columns with ranges: {', '.join(numeric)}", col)
        if col not in numeric:
            raise _bad(source, f"[{col}] is a {schema.column(col).dtype} column; only numeric columns have ranges",
                       f"remove [{col}]; numeric columns: {', '.join(numeric)}", col)
        if not isinstance(spec, Mapping):
            raise _bad(source, f"{col} = {spec!r} is not a table", f"write it as a table: [{col}] with min = .., max = ..", col)
        unknown = [k for k in spec if k not in ("min", "max", "action")]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), ["min", "max", "action"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _bad(source, f"[{col}] has an unknown key {unknown[0]!r}{hint}", "use only min, max and action", col)
        base = out.get(col, Range(None, None))
        lo = _bound(source, col, "min", spec["min"]) if "min" in spec else base.min
        hi = _bound(source, col, "max", spec["max"]) if "max" in spec else base.max
        action = spec.get("action", base.action)
        if action not in ACTIONS:
            raise _bad(source, f"[{col}] action = {action!r} is not one of {', '.join(map(repr, ACTIONS))}",
                       'write action = "error" (stop) or action = "missing" (treat as missing, counted warning)', col)
        if lo is not None and hi is not None and lo > hi:
            raise _bad(source, f"[{col}] min = {lo:g} is above max = {hi:g}", "swap or correct the bounds", col)
        out[col] = Range(lo, hi, action)
    return out


def load_ranges(path: str | os.PathLike) -> tuple[str, dict]:
    """Read a ranges TOML file.

    Returns
    -------
    (str, dict)
        The file name (for messages) and its tables.

    Raises
    ------
    DataFileError
        Missing, unreadable, starting with a UTF-8 byte-order mark (which TOML does not allow),
        not UTF-8 or not valid TOML.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except IsADirectoryError:
        raise _bad(p, "is a directory, not a ranges file", "pass the path of a TOML file (README: plausibility ranges)") from None
    except OSError as exc:
        raise _bad(p, f"cannot read the ranges file ({exc.strerror or exc})",
                   "pass the path of an existing TOML file (README: plausibility ranges)") from None
    if raw.startswith(UTF8_BOM):  # refused, as fl-client refuses a policy file with one
        raise _bad(p, "the file starts with a byte-order mark (BOM), which TOML does not allow", BOM_FIX)
    try:
        return str(p), load_toml(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _bad(p, "not UTF-8 text", "save the ranges file as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise _bad(p, f"not valid TOML ({exc})", "write one table per column, e.g. [age] then min = 0 and max = 120") from None
