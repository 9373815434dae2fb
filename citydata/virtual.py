"""Virtual sites: a department's records split into N simulated nodes (flwr-datasets partitioners).

For scale tests and non-IID studies, ``fl-sim run --virtual-sites N`` replaces a department's
natural sites (hospitals, detectors, grids) by N virtual nodes. The pooled *training* windows
of all natural sites are split by a Flower Datasets partitioner:

* ``iid``: :class:`flwr_datasets.partitioner.IidPartitioner` (equal random shares);
* ``dirichlet``: :class:`flwr_datasets.partitioner.DirichletPartitioner` over the label
  (health: disease yes/no) or over the record's natural site (forecasting: each virtual node
  draws mostly from a few detectors/grids), concentration ``alpha``.

Each virtual node tests on an IID share of the pooled *test* windows. Preprocessing stays the
natural sites' own (scalers fitted on each natural site's training period), and forecasting
metrics are converted back to original units row by row with the scaler of the site each
window came from.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .base import DepartmentDataset, SiteData, Split

PARTITIONERS = ("iid", "dirichlet")


def _pooled(ds: DepartmentDataset, part: str):
    xs, ys, naive, means, stds, origin = [], [], {}, [], [], []
    for i, site in enumerate(ds.sites):
        sd = ds.site_data(site)
        sp = sd.train if part == "train" else sd.test
        xs.append(sp.X)
        ys.append(sp.y)
        for k, v in (sp.naive or {}).items():
            naive.setdefault(k, []).append(v)
        means.append(np.full(len(sp), sd.target_mean))
        stds.append(np.full(len(sp), sd.target_std))
        origin.append(np.full(len(sp), i))
    cat = np.concatenate
    return (cat(xs), cat(ys), {k: cat(v) for k, v in naive.items()}, cat(means), cat(stds), cat(origin))


def _partition_rows(labels: np.ndarray, n: int, partitioner: str, alpha: float, seed: int) -> list[np.ndarray]:
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
    return [np.asarray(part.load_partition(k)["row"], dtype=np.int64) for k in range(n)]


@lru_cache(maxsize=8)
def _virtual(ds: DepartmentDataset, n: int, partitioner: str, alpha: float, seed: int) -> tuple[SiteData, ...]:
    classification = ds.schema.task == "binary-classification"
    Xtr, ytr, _, _, _, otr = _pooled(ds, "train")
    Xte, yte, nte, mte, ste, ote = _pooled(ds, "test")
    train_labels = ytr.astype(np.int64) if classification else otr
    train_rows = _partition_rows(train_labels, n, partitioner, alpha, seed)
    test_rows = _partition_rows(yte.astype(np.int64) if classification else ote, n, "iid", alpha, seed + 1)
    out = []
    for k in range(n):
        tr, te = train_rows[k], test_rows[k]
        test = Split(Xte[te], yte[te], {name: v[te] for name, v in nte.items()} or None)
        if classification:
            mean, std = 0.0, 1.0
        else:  # per-row scalers of the windows' natural sites: to_original works row by row
            mean, std = mte[te][:, None], ste[te][:, None]
        out.append(SiteData(site=f"virtual-{k}", train=Split(Xtr[tr], ytr[tr]), test=test, target_mean=mean,
                            target_std=std, meta={"partitioner": partitioner, "alpha": alpha,
                                                  "natural_sites": sorted({ds.sites[i] for i in otr[tr]})}))
    return tuple(out)


def virtual_sites(ds: DepartmentDataset, n: int, partitioner: str = "iid", alpha: float = 0.5,
                  seed: int = 0) -> list[SiteData]:
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
    if n < 1:
        raise ValueError(f"virtual sites: n must be >= 1, got {n}")
    n_train = sum(len(ds.site_data(s).train) for s in ds.sites)
    if n > n_train:
        raise ValueError(f"virtual sites: {n} sites but only {n_train} {ds.department} training windows; "
                         f"use at most {n_train}")
    if partitioner == "dirichlet" and not alpha > 0:
        raise ValueError(f"virtual sites: Dirichlet alpha must be > 0, got {alpha}")
    return list(_virtual(ds, int(n), partitioner, float(alpha), int(seed)))
