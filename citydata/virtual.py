"""Virtual sites: a department's records split into N simulated nodes (flwr-datasets partitioners).

For scale tests and non-IID studies, ``fl-sim run --virtual-sites N`` replaces a department's
natural sites (hospitals, detectors, grids) by N virtual nodes. The pooled *training* windows
of all natural sites are split by a Flower Datasets partitioner:

* ``iid``: :class:`flwr_datasets.partitioner.IidPartitioner` (equal random shares);
* ``dirichlet``: :class:`flwr_datasets.partitioner.DirichletPartitioner` over the label
  (health: disease yes/no) or over the record's natural site (forecasting: each virtual node
  draws mostly from a few detectors/grids), concentration ``alpha``.

Each virtual node tests on an IID share of the pooled *test* windows. Preprocessing stays the
natural sites' own (forecasting: each window normalised by its own lookback; health: the fixed
constants of :data:`citydata.health.REFERENCE`), and each forecasting window keeps its own
statistics (``Split.loc`` / ``Split.scale``), so metrics are converted back to original units
row by row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .base import DepartmentDataset, SiteData, Split

PARTITIONERS = ("iid", "dirichlet")


def _pooled(ds: DepartmentDataset, part: str):
    xs, ys, naive, locs, scales, origin = [], [], {}, [], [], []
    for i, site in enumerate(ds.sites):
        sd = ds.site_data(site)
        sp = sd.train if part == "train" else sd.test
        xs.append(sp.X)
        ys.append(sp.y)
        for k, v in (sp.naive or {}).items():
            naive.setdefault(k, []).append(v)
        if sp.loc is not None:
            locs.append(sp.loc)
            scales.append(sp.scale)
        origin.append(np.full(len(sp), i))
    cat = np.concatenate
    return (cat(xs), cat(ys), {k: cat(v) for k, v in naive.items()}, cat(locs) if locs else None,
            cat(scales) if scales else None, cat(origin))


def _partitioner(labels: np.ndarray, n: int, partitioner: str, alpha: float, seed: int):
    """A Flower Datasets partitioner over the row numbers of ``labels`` (nothing split yet)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if partitioner == "iid":
        part = IidPartitioner(num_partitions=n)
    elif partitioner == "dirichlet":
        part = DirichletPartitioner(num_partitions=n, partition_by="label", alpha=alpha, min_partition_size=0,
                                    self_balancing=False, seed=seed)
    else:
        raise ValueError(f"unknown partitioner {partitioner!r}; choose one of {', '.join(PARTITIONERS)}")
    if partitioner == "iid":
        # IidPartitioner keeps row order; shuffle once (seeded) so shares are random
        order = np.random.default_rng(seed).permutation(len(labels))
    else:
        order = np.arange(len(labels))
    part.dataset = Dataset.from_dict({"row": order.astype(np.int64), "label": labels[order].astype(np.int64)})
    return part


@dataclass(frozen=True)
class _Plan:
    """One copy of the pooled arrays and the two partitioners; a site is cut from them on demand."""

    train: tuple  # X, y, loc, scale, origin
    test: tuple  # X, y, naive, loc, scale, origin
    train_part: object
    test_part: object
    classification: bool


@lru_cache(maxsize=8)
def _plan(ds: DepartmentDataset, n: int, partitioner: str, alpha: float, seed: int) -> _Plan:
    classification = ds.schema.task == "binary-classification"
    Xtr, ytr, _, ltr, str_, otr = _pooled(ds, "train")
    test = _pooled(ds, "test")
    train_labels = ytr.astype(np.int64) if classification else otr
    test_labels = test[1].astype(np.int64) if classification else test[5]
    return _Plan((Xtr, ytr, ltr, str_, otr), test, _partitioner(train_labels, n, partitioner, alpha, seed),
                 _partitioner(test_labels, n, "iid", alpha, seed + 1), classification)


def _rows(part, k: int) -> np.ndarray:
    """Row numbers of partition ``k``.

    With more IID partitions than rows, partition ``k >= rows`` is empty (the contiguous
    shards hold one row each, then none); ``datasets`` refuses to cut such a shard.
    """
    from flwr_datasets.partitioner import IidPartitioner

    if isinstance(part, IidPartitioner) and k >= len(part.dataset):
        return np.zeros(0, dtype=np.int64)
    return np.asarray(part.load_partition(k)["row"], dtype=np.int64)


def _site(ds: DepartmentDataset, plan: _Plan, k: int, n: int, partitioner: str, alpha: float) -> SiteData:
    Xtr, ytr, ltr, str_, otr = plan.train
    Xte, yte, nte, lte, ste, _ = plan.test
    tr, te = _rows(plan.train_part, k), _rows(plan.test_part, k)
    rows = lambda a, r: None if a is None else a[r]  # noqa: E731  (per-window statistics travel with their rows)
    test = Split(Xte[te], yte[te], {name: v[te] for name, v in nte.items()} or None, loc=rows(lte, te), scale=rows(ste, te))
    train = Split(Xtr[tr], ytr[tr], loc=rows(ltr, tr), scale=rows(str_, tr))
    return SiteData(site=f"virtual-{k}", train=train, test=test,
                    meta={"partitioner": partitioner, "alpha": alpha,
                          "natural_sites": sorted({ds.sites[i] for i in otr[tr]})})


def check_virtual_sites(ds: DepartmentDataset, n: int, partitioner: str, alpha: float, allow_empty: bool) -> None:
    """Check that ``n`` virtual sites can be cut from ``ds`` with ``partitioner`` (the nodes' own check).

    Raises
    ------
    ValueError
        ``n`` below 1, an unknown partitioner, more sites than training records (unless empty
        sites are allowed with ``iid``), or a Dirichlet ``alpha`` that is not > 0.
    """
    if n < 1:
        raise ValueError(f"virtual sites: n must be >= 1, got {n}")
    if partitioner not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {partitioner!r}; choose one of {', '.join(PARTITIONERS)}")
    n_train = sum(len(ds.site_data(s).train) for s in ds.sites)
    if n > n_train and not (allow_empty and partitioner == "iid"):
        unit = "training records (patients)" if ds.schema.task == "binary-classification" else "training windows"
        raise ValueError(f"virtual sites: {n} sites but only {n_train} {ds.department} {unit}; "
                         f"use at most {n_train} (or, for a scale test with the iid partitioner, allow empty "
                         f"sites: node-config key virtual-allow-empty=true, as benchmarks/sim_scale.py --allow-empty sets it)")
    if partitioner == "dirichlet" and not alpha > 0:
        raise ValueError(f"virtual sites: Dirichlet alpha must be > 0, got {alpha}")


def empty_sites(ds: DepartmentDataset, n: int, partitioner: str, alpha: float, seed: int) -> int:
    """How many of ``n`` virtual sites would hold no training record (a Dirichlet draw can leave some empty).

    Parameters
    ----------
    ds, n, partitioner, alpha, seed
        As in :func:`virtual_sites` (checked by :func:`check_virtual_sites` first).

    Returns
    -------
    int
        The number of sites without a training record (0 for ``iid`` with at most one site per record).
    """
    plan = _plan(ds, int(n), partitioner, float(alpha), int(seed))
    return sum(1 for k in range(int(n)) if len(_rows(plan.train_part, k)) == 0)


def virtual_site(ds: DepartmentDataset, n: int, k: int, partitioner: str = "iid", alpha: float = 0.5, seed: int = 0,
                 *, allow_empty: bool = False) -> SiteData:
    """The ``k``-th of ``n`` virtual sites alone (what a simulated node loads).

    Only this site's rows are copied out of the pooled arrays, which are held once per
    process (cached with the partitioners, not the ``n`` sites), so a Ray worker that plays
    thousands of nodes holds one copy of the department's data. The result is the same
    :class:`SiteData` as ``virtual_sites(ds, n, ...)[k]``.

    Parameters
    ----------
    ds, n, partitioner, alpha, seed
        As in :func:`virtual_sites`.
    k : int
        Site index, ``0 <= k < n``.
    allow_empty : bool
        As in :func:`virtual_sites`.

    Returns
    -------
    SiteData
        ``virtual-{k}``.

    Raises
    ------
    ValueError
        As :func:`virtual_sites`, or ``k`` outside ``[0, n)``.
    """
    n, k = int(n), int(k)
    if not 0 <= k < n:
        raise ValueError(f"virtual sites: site index (partition-id) {k} outside 0..{n - 1}")
    check_virtual_sites(ds, n, partitioner, alpha, allow_empty)
    return _site(ds, _plan(ds, n, partitioner, float(alpha), int(seed)), k, n, partitioner, float(alpha))


def virtual_sites(ds: DepartmentDataset, n: int, partitioner: str = "iid", alpha: float = 0.5,
                  seed: int = 0, *, allow_empty: bool = False) -> list[SiteData]:
    """Split a department's pooled data into ``n`` virtual sites.

    Parameters
    ----------
    ds : DepartmentDataset
        The department (bundled data or an operator file).
    n : int
        Number of virtual sites (>= 1).
    partitioner : {"iid", "dirichlet"}
        Flower Datasets partitioner for the training windows.
    alpha : float
        Dirichlet concentration (smaller = more skewed); ignored for ``iid``.
    seed : int
        Partitioning seed.
    allow_empty : bool
        Scale tests only: with the ``iid`` partitioner, allow more sites than training
        windows; the sites beyond hold no training window (their nodes answer "no training
        records").

    Returns
    -------
    list of SiteData
        ``virtual-0`` ... ``virtual-{n-1}``; a site may hold no test windows when ``n``
        exceeds the pooled test set.

    Raises
    ------
    ValueError
        Unknown partitioner, ``n < 1``, more virtual sites than training windows, or
        ``alpha <= 0``.
    """
    n = int(n)
    check_virtual_sites(ds, n, partitioner, alpha, allow_empty)
    plan = _plan(ds, n, partitioner, float(alpha), int(seed))
    return [_site(ds, plan, k, n, partitioner, float(alpha)) for k in range(n)]
