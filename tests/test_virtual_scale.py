"""Virtual sites at scale: a node loads its own share only; empty sites only when asked."""

from __future__ import annotations

import numpy as np
import pytest

import citydata.virtual as virtual
from citydata import load_department
from citydata.virtual import virtual_site, virtual_sites
from clients.node import NoTrainingData, node_from_config


def _same(a, b):
    assert a.site == b.site and a.meta == b.meta
    for x, y in ((a.train.X, b.train.X), (a.train.y, b.train.y), (a.test.X, b.test.X), (a.test.y, b.test.y)):
        np.testing.assert_array_equal(x, y)
    for part in ("train", "test"):  # forecasting: each window's own statistics travel with it
        for stat in ("loc", "scale"):
            x, y = getattr(getattr(a, part), stat), getattr(getattr(b, part), stat)
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("department,partitioner", [("health", "iid"), ("health", "dirichlet"), ("utility", "iid")])
def test_one_virtual_site_equals_that_site_of_the_whole_split(department, partitioner):
    ds = load_department(department)
    every = virtual_sites(ds, 9, partitioner, alpha=0.4, seed=5)
    for k in (0, 4, 8):
        _same(virtual_site(ds, 9, k, partitioner, alpha=0.4, seed=5), every[k])


def test_a_node_cuts_only_its_own_site(monkeypatch):
    """A worker playing many nodes must not build (and hold) all n sites to serve one."""
    ds = load_department("health")
    built = []
    real = virtual._site
    monkeypatch.setattr(virtual, "_site", lambda ds, plan, k, *a: built.append(k) or real(ds, plan, k, *a))
    site = virtual_site(ds, 200, 17)
    assert built == [17] and site.site == "virtual-17"
    # the cache keeps the pooled arrays and the partitioners, no per-site arrays
    plan = virtual._plan(ds, 200, "iid", 0.5, 0)
    arrays = [a for a in (*plan.train, *plan.test) if isinstance(a, np.ndarray)]
    assert all(len(a) >= 200 for a in arrays)


def test_virtual_site_rejects_an_index_outside_the_sites():
    ds = load_department("health")
    with pytest.raises(ValueError, match="partition-id"):
        virtual_site(ds, 5, 5)


def test_more_sites_than_windows_only_when_asked_and_only_iid():
    ds = load_department("health")
    n_train = sum(len(ds.site_data(s).train) for s in ds.sites)
    n = n_train + 50
    with pytest.raises(ValueError, match="virtual-allow-empty"):
        virtual_site(ds, n, 0)
    with pytest.raises(ValueError, match="at most"):
        virtual_sites(ds, n, "dirichlet", allow_empty=True)
    parts = virtual_sites(ds, n, allow_empty=True)
    sizes = [len(p.train) for p in parts]
    assert sum(sizes) == n_train and set(sizes) == {0, 1}


def test_an_empty_virtual_node_sends_no_update(tmp_path):
    """A node of a site beyond the windows raises NoTrainingData (its ClientApp answers NO_DATA)."""
    from clients.node import handle_train
    from shared_models import build_model, default_model_config

    ds = load_department("health")
    n = sum(len(ds.site_data(s).train) for s in ds.sites) + 10
    sizes = {k: len(virtual_site(ds, n, k, allow_empty=True).train) for k in range(n)}
    empty = next(k for k, size in sizes.items() if size == 0)
    cfg = {"department": "health", "virtual-sites": n, "partition-id": empty, "virtual-allow-empty": "true",
           "ledger-dir": str(tmp_path), "policy": "examples/policies/health.toml"}
    spec = node_from_config(cfg, {})
    assert spec.virtual[-1] is True and len(spec.site_data()[1].train) == 0
    with pytest.raises(NoTrainingData):
        handle_train(build_model(default_model_config(ds.schema, None)).state_dict(), {"server-round": 1}, spec)
