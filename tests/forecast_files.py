"""Tests' own forecasting files need a test start, as a node's do (``--test-start``).

A node configures its test start once and keeps it; these tests pick one three quarters into
each synthetic file's range, on the hour, so that both sides hold complete windows.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def quarter_start(source, time_column: str = "timestamp") -> str:
    """The hour three quarters into the time range of ``source`` (a frame or a CSV/Parquet file)."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        frame = pd.read_parquet(p, columns=[time_column]) if p.suffix == ".parquet" else pd.read_csv(p, usecols=[time_column])
    else:
        frame = source
    t = pd.to_datetime(frame[time_column], utc=True, format="mixed").dt.tz_convert(None).dropna()
    return (t.min() + (t.max() - t.min()) * 0.75).floor("1h").isoformat()


def own(cls, path, **kw):
    """``cls(path, test_start=<three quarters in>, **kw)``."""
    return cls(path, test_start=kw.pop("test_start", None) or quarter_start(path), **kw)
