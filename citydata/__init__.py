"""Department dataset adapters (health, traffic, utility).

Each adapter reads the real records bundled in an installed package (``path=None``) or an
operator's own CSV/Parquet file in the documented schema, validates it and exposes per-site
train/test arrays, FLamby style::

    from citydata import load_department
    ds = load_department("traffic")
    ds.sites                     # ['detector-1', ...]
    site = ds.site_data("detector-1")
    site.train.X.shape           # (n, 32, 5)
    ds.load("detector-1", train=False)   # TensorDataset
"""

from __future__ import annotations

import os

from .base import (Column, DataFileError, DataQualityWarning, DepartmentDataset, Schema, SiteData, Split)
from .health import HeartDisease
from .traffic import TrafficCounts
from .utility import ElectricityDemand

__all__ = [
    "Column",
    "DATASETS",
    "DataFileError",
    "DataQualityWarning",
    "DepartmentDataset",
    "ElectricityDemand",
    "HeartDisease",
    "Schema",
    "SiteData",
    "Split",
    "TrafficCounts",
    "load_department",
]

#: Department name -> adapter class.
DATASETS: dict[str, type[DepartmentDataset]] = {
    "health": HeartDisease,
    "traffic": TrafficCounts,
    "utility": ElectricityDemand,
}


def load_department(name: str, path: str | os.PathLike | None = None, **kw) -> DepartmentDataset:
    """Open a department's dataset.

    Parameters
    ----------
    name : str
        ``"health"``, ``"traffic"`` or ``"utility"``.
    path : str or os.PathLike, optional
        Operator file (CSV/Parquet) in the department schema; ``None`` for the bundled data.
    **kw
        Passed to the adapter: ``seed``, ``test_fraction``, ``date_format`` (``"DMY"``,
        ``"MDY"``, ``"ISO"`` or a strftime pattern, for dates that are not year-first) and
        ``ranges`` (plausibility-range overrides: a TOML file or a mapping); see
        :class:`~citydata.base.DepartmentDataset`.

    Returns
    -------
    DepartmentDataset

    Raises
    ------
    ValueError
        For an unknown department (the message lists the valid names).
    DataFileError
        For a bad operator file or ranges file (file, column, rows, fix; never a record's values).
    """
    try:
        cls = DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown department {name!r}; choose one of: {', '.join(DATASETS)}") from None
    return cls(path, **kw)
